import { useEffect, useRef, useState, type FormEvent } from "react";
import { errorMessage, isAbortError } from "../api";
import {
  MIB,
  parseArchitectures,
  parseNumberField,
  runtimeFromFileName,
  validateModelName,
  validateVersion,
} from "../models";
import { MODEL_RUNTIMES, uploadModel, type ModelReleasePublic, type ModelRuntime, type UploadProgress } from "../modelsApi";
import { ProgressBar } from "./ProgressBar";

const DEFAULT_EXPIRY_DAYS = 365;
const MAX_EXPIRY_DAYS = 3650;
/** 1 TiB in MiB: a sanity bound, not a policy. */
const MAX_SIZE_MB = 1024 * 1024;

interface UploadDraft {
  name: string;
  version: string;
  runtime: ModelRuntime;
  /** Whether the operator picked the runtime (then the weights' extension no longer changes it). */
  runtimeChosen: boolean;
  architectures: string;
  minRamMb: string;
  minDiskMb: string;
  expiresInDays: string;
  encrypt: boolean;
}

const EMPTY: UploadDraft = {
  name: "",
  version: "",
  runtime: "onnx",
  runtimeChosen: false,
  architectures: "",
  minRamMb: "",
  minDiskMb: "",
  expiresInDays: String(DEFAULT_EXPIRY_DAYS),
  encrypt: false,
};

type ExtraRole = "tokenizer" | "labels" | "config";

const EXTRA_FILES: readonly { role: ExtraRole; label: string; hint: string }[] = [
  { role: "labels", label: "Labels", hint: "one class name per line (classifiers)" },
  { role: "tokenizer", label: "Tokenizer", hint: "if the runtime needs one apart from the weights" },
  { role: "config", label: "Config", hint: "model configuration, e.g. JSON" },
];

/** Upload a model release: weights and optional files, constraints, expiry, encryption. */
export function ModelUploadForm({ onUploaded }: { onUploaded: (release: ModelReleasePublic) => void }) {
  const formRef = useRef<HTMLFormElement>(null);
  const [draft, setDraft] = useState<UploadDraft>(EMPTY);
  const [weights, setWeights] = useState<File | null>(null);
  const [extras, setExtras] = useState<Partial<Record<ExtraRole, File>>>({});
  const [progress, setProgress] = useState<UploadProgress | null>(null);
  const [uploading, setUploading] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const [uploaded, setUploaded] = useState<ModelReleasePublic | null>(null);
  const controller = useRef<AbortController | null>(null);

  useEffect(() => () => controller.current?.abort(), []);

  const edit = (patch: Partial<UploadDraft>): void => setDraft((d) => ({ ...d, ...patch }));

  function pickWeights(file: File | null): void {
    setWeights(file);
    if (file === null) return;
    const guessed = runtimeFromFileName(file.name);
    setDraft((d) => {
      const next = { ...d };
      if (guessed !== null && !d.runtimeChosen) next.runtime = guessed;
      // Offer the file's stem as the name when none is typed yet, if it is a valid one.
      if (d.name === "") {
        const stem = file.name.replace(/\.[^.]*$/, "").toLowerCase();
        if (validateModelName(stem) === null) next.name = stem;
      }
      return next;
    });
  }

  async function submit(event: FormEvent<HTMLFormElement>): Promise<void> {
    event.preventDefault();
    setUploaded(null);
    const name = draft.name.trim();
    const version = draft.version.trim();
    const problem = weights === null ? "Choose the weights file." : (validateModelName(name) ?? validateVersion(version));
    if (problem !== null || weights === null) {
      setError(problem);
      return;
    }
    const ram = parseNumberField(draft.minRamMb, "Minimum RAM", { min: 0, max: MAX_SIZE_MB, fallback: 0 });
    if (!ram.ok) return setError(ram.error);
    const disk = parseNumberField(draft.minDiskMb, "Minimum disk", { min: 0, max: MAX_SIZE_MB, fallback: 0 });
    if (!disk.ok) return setError(disk.error);
    const days = parseNumberField(draft.expiresInDays, "Expiry", {
      min: 1,
      max: MAX_EXPIRY_DAYS,
      integer: true,
      fallback: DEFAULT_EXPIRY_DAYS,
    });
    if (!days.ok) return setError(days.error);

    const abort = new AbortController();
    controller.current = abort;
    setUploading(true);
    setError(null);
    setProgress({ loaded: 0, total: weights.size });
    try {
      const release = await uploadModel(
        {
          weights,
          name,
          version,
          runtime: draft.runtime,
          tokenizer: extras.tokenizer,
          labels: extras.labels,
          config: extras.config,
          architectures: parseArchitectures(draft.architectures),
          minRamBytes: Math.round(ram.value * MIB),
          minDiskBytes: Math.round(disk.value * MIB),
          expiresInDays: days.value,
          encrypt: draft.encrypt,
        },
        setProgress,
        abort.signal,
      );
      setUploaded(release);
      setDraft(EMPTY);
      setWeights(null);
      setExtras({});
      formRef.current?.reset();
      onUploaded(release);
    } catch (err) {
      setError(isAbortError(err) ? "The upload was cancelled." : errorMessage(err));
    } finally {
      controller.current = null;
      setUploading(false);
      setProgress(null);
    }
  }

  return (
    <form
      ref={formRef}
      className="form upload-form"
      data-testid="upload-form"
      aria-labelledby="upload-heading"
      onSubmit={(e) => void submit(e)}
    >
      <h2 id="upload-heading">Upload a model</h2>
      <fieldset className="upload-fields" disabled={uploading}>
        <div className="field-row">
          <label className="field field-wide">
            <span className="field-label">Weights file</span>
            <input
              type="file"
              name="weights"
              accept=".onnx,.tflite,.gguf"
              required
              onChange={(e) => pickWeights(e.target.files?.[0] ?? null)}
            />
          </label>
        </div>
        <div className="field-row">
          <label className="field">
            <span className="field-label">Name</span>
            <input
              type="text"
              name="name"
              autoComplete="off"
              placeholder="e.g. defect-detector"
              value={draft.name}
              onChange={(e) => edit({ name: e.target.value })}
            />
          </label>
          <label className="field">
            <span className="field-label">Version</span>
            <input
              type="text"
              name="version"
              autoComplete="off"
              placeholder="e.g. 1.0.0"
              value={draft.version}
              onChange={(e) => edit({ version: e.target.value })}
            />
          </label>
          <label className="field">
            <span className="field-label">Runtime</span>
            <select
              name="runtime"
              value={draft.runtime}
              onChange={(e) => {
                const runtime = MODEL_RUNTIMES.find((r) => r === e.target.value);
                if (runtime) edit({ runtime, runtimeChosen: true });
              }}
            >
              {MODEL_RUNTIMES.map((r) => (
                <option key={r} value={r}>
                  {r}
                </option>
              ))}
            </select>
          </label>
        </div>
        <div className="field-row">
          {EXTRA_FILES.map(({ role, label, hint }) => (
            <label className="field" key={role}>
              <span className="field-label">
                {label} <span className="muted small">(optional)</span>
              </span>
              <input
                type="file"
                name={role}
                title={hint}
                onChange={(e) => {
                  const file = e.target.files?.[0];
                  setExtras((current) => {
                    const next = { ...current };
                    if (file) next[role] = file;
                    else delete next[role];
                    return next;
                  });
                }}
              />
            </label>
          ))}
        </div>
        <div className="field-row">
          <label className="field">
            <span className="field-label">Architectures</span>
            <input
              type="text"
              name="architectures"
              autoComplete="off"
              placeholder="any (or e.g. aarch64, x86_64)"
              value={draft.architectures}
              onChange={(e) => edit({ architectures: e.target.value })}
            />
          </label>
          <label className="field">
            <span className="field-label">Minimum free RAM (MB)</span>
            <input
              type="number"
              name="min_ram_mb"
              min={0}
              step="any"
              placeholder="0"
              value={draft.minRamMb}
              onChange={(e) => edit({ minRamMb: e.target.value })}
            />
          </label>
          <label className="field">
            <span className="field-label">Minimum free disk (MB)</span>
            <input
              type="number"
              name="min_disk_mb"
              min={0}
              step="any"
              placeholder="0"
              value={draft.minDiskMb}
              onChange={(e) => edit({ minDiskMb: e.target.value })}
            />
          </label>
          <label className="field">
            <span className="field-label">Expires after (days)</span>
            <input
              type="number"
              name="expires_in_days"
              min={1}
              max={MAX_EXPIRY_DAYS}
              step={1}
              value={draft.expiresInDays}
              onChange={(e) => edit({ expiresInDays: e.target.value })}
            />
          </label>
        </div>
        <label className="checkbox">
          <input
            type="checkbox"
            name="encrypt"
            checked={draft.encrypt}
            onChange={(e) => edit({ encrypt: e.target.checked })}
          />
          <span>
            Encrypt the stored files (AES-256-GCM; the key reaches only the devices a deployment targets)
          </span>
        </label>
      </fieldset>
      {progress !== null && (
        <ProgressBar testId="upload-progress" label="Upload progress" done={progress.loaded} total={progress.total} />
      )}
      <div className="form-actions">
        <button type="submit" className="button button-primary" disabled={uploading}>
          {uploading ? "Uploading…" : "Upload model"}
        </button>
        {uploading && (
          <button type="button" className="button" onClick={() => controller.current?.abort()}>
            Cancel upload
          </button>
        )}
        {error && (
          <span className="form-error" role="alert" data-testid="upload-error">
            {error}
          </span>
        )}
        {uploaded && !error && (
          <span className="form-ok" role="status" data-testid="upload-result">
            Uploaded {uploaded.name} {uploaded.version} as release {uploaded.release}.
          </span>
        )}
      </div>
    </form>
  );
}
