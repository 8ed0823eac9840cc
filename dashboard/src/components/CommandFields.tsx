import { COMMAND_TYPES, EXPIRY_OPTIONS, newParamRow, paramKeysFor, type CommandDraft, type ParamRow } from "../commands";

interface CommandFieldsProps {
  draft: CommandDraft;
  onChange: (draft: CommandDraft) => void;
  /** Prefix for element ids, unique per form on the page. */
  idPrefix: string;
  disabled?: boolean;
}

/** Command type, parameter rows and expiry: the fields shared by the device and tag forms. */
export function CommandFields({ draft, onChange, idPrefix, disabled = false }: CommandFieldsProps) {
  const keysId = `${idPrefix}-param-keys`;
  const setRows = (params: ParamRow[]): void => onChange({ ...draft, params });
  const updateRow = (id: number, patch: Partial<Omit<ParamRow, "id">>): void =>
    setRows(draft.params.map((row) => (row.id === id ? { ...row, ...patch } : row)));

  return (
    <fieldset className="command-fields" disabled={disabled}>
      <div className="field-row">
        <label className="field" htmlFor={`${idPrefix}-type`}>
          <span className="field-label">Command</span>
          <select
            id={`${idPrefix}-type`}
            name="command-type"
            value={draft.type}
            onChange={(e) => onChange({ ...draft, type: e.target.value })}
          >
            {COMMAND_TYPES.map((t) => (
              <option key={t.type} value={t.type}>
                {t.label}
              </option>
            ))}
          </select>
        </label>
        <label className="field" htmlFor={`${idPrefix}-expiry`}>
          <span className="field-label">Expires after</span>
          <select
            id={`${idPrefix}-expiry`}
            name="command-expiry"
            value={draft.expiresInS}
            onChange={(e) => onChange({ ...draft, expiresInS: Number(e.target.value) })}
          >
            {EXPIRY_OPTIONS.map((o) => (
              <option key={o.seconds} value={o.seconds}>
                {o.label}
              </option>
            ))}
          </select>
        </label>
      </div>

      <div className="params" role="group" aria-label="Parameters">
        <span className="field-label">Parameters</span>
        {draft.params.length === 0 && <span className="muted small">None.</span>}
        {draft.params.map((row, index) => (
          <div className="param-row" key={row.id} data-testid="param-row">
            <input
              type="text"
              name="param-key"
              placeholder="name"
              aria-label={`Parameter ${index + 1} name`}
              list={keysId}
              autoComplete="off"
              value={row.key}
              onChange={(e) => updateRow(row.id, { key: e.target.value })}
            />
            <input
              type="text"
              name="param-value"
              placeholder="value"
              aria-label={`Parameter ${index + 1} value`}
              autoComplete="off"
              value={row.value}
              onChange={(e) => updateRow(row.id, { value: e.target.value })}
            />
            <button
              type="button"
              className="button button-quiet"
              aria-label={`Remove parameter ${index + 1}`}
              onClick={() => setRows(draft.params.filter((r) => r.id !== row.id))}
            >
              ×
            </button>
          </div>
        ))}
        <datalist id={keysId}>
          {paramKeysFor(draft.type).map((key) => (
            <option key={key} value={key} />
          ))}
        </datalist>
        <div>
          <button type="button" className="button button-quiet" onClick={() => setRows([...draft.params, newParamRow()])}>
            Add parameter
          </button>
        </div>
        <p className="hint">
          Values like <code>5</code>, <code>true</code> or <code>null</code> are sent as JSON; anything else as text
          (quote it, <code>"5"</code>, to force text).
        </p>
      </div>
    </fieldset>
  );
}
