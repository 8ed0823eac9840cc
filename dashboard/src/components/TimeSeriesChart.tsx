import { useEffect, useRef } from "react";
import uPlot from "uplot";

export interface ChartSeries {
  label: string;
  color: string;
  values: (number | null)[];
}

/** How the y axis is scaled: fixed 0–100, from zero up to the data, or padded around the data. */
export type YScale = "percent" | "zero-based" | "auto";

export interface TimeSeriesChartProps {
  testId: string;
  title: string;
  /** Unix seconds, ascending; one entry per value in each series. */
  xs: number[];
  series: ChartSeries[];
  /** Visible x window in unix seconds. */
  xRange: readonly [number, number];
  yScale: YScale;
  formatValue: (value: number) => string;
  height?: number;
  /**
   * Draw each series' line across its nulls and mark every point: for series sampled at
   * irregular times (one result each), where a null means "another series' sample" not silence.
   */
  spanGaps?: boolean;
}

const AXIS_STROKE = "#64748b";
const GRID_STROKE = "#e8edf3";

function yRange(kind: YScale): uPlot.Scale.Range {
  return (_u, dataMin, dataMax) => {
    const hasData = Number.isFinite(dataMin) && Number.isFinite(dataMax);
    if (kind === "percent") return [0, 100];
    if (!hasData) return [0, 1];
    if (kind === "zero-based") {
      const max = dataMax > 0 ? dataMax * 1.15 : 1;
      return [Math.min(0, dataMin), max];
    }
    const pad = Math.max((dataMax - dataMin) * 0.15, 1);
    return [Math.floor(dataMin - pad), Math.ceil(dataMax + pad)];
  };
}

const AXIS_FONT = '12px system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif';
let measureCtx: CanvasRenderingContext2D | null = null;

/** Widens the y axis to fit its longest tick label (a fixed size clips long units like "KB/s"). */
function yAxisSize(_u: uPlot, values: string[] | null): number {
  if (!values || values.length === 0) return 50;
  measureCtx ??= document.createElement("canvas").getContext("2d");
  if (!measureCtx) return 80;
  measureCtx.font = AXIS_FONT;
  const widest = Math.max(...values.map((v) => measureCtx?.measureText(v).width ?? 0));
  return Math.ceil(widest) + 20;
}

/** A uPlot line chart that follows its container's width. */
export function TimeSeriesChart(props: TimeSeriesChartProps) {
  const { testId, title, xs, series, xRange, yScale, formatValue, height = 200, spanGaps = false } = props;
  const container = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  const xRangeRef = useRef(xRange);
  const formatRef = useRef(formatValue);
  xRangeRef.current = xRange;
  formatRef.current = formatValue;

  // The chart is rebuilt only when the set of series changes; data updates go through setData.
  const shape = series.map((s) => `${s.label}:${s.color}`).join("|") + `|${yScale}|${height}|${spanGaps}`;

  useEffect(() => {
    const el = container.current;
    if (!el) return;
    const fmt = (v: number | null | undefined): string =>
      v == null || !Number.isFinite(v) ? "—" : formatRef.current(v);
    const opts: uPlot.Options = {
      width: Math.max(el.clientWidth, 200),
      height,
      cursor: { drag: { x: false, y: false, setScale: false } },
      legend: { show: true, live: true },
      scales: {
        x: { time: true, range: () => [xRangeRef.current[0], xRangeRef.current[1]] },
        y: { range: yRange(yScale) },
      },
      axes: [
        { stroke: AXIS_STROKE, font: AXIS_FONT, grid: { stroke: GRID_STROKE, width: 1 }, ticks: { stroke: GRID_STROKE } },
        {
          stroke: AXIS_STROKE,
          font: AXIS_FONT,
          grid: { stroke: GRID_STROKE, width: 1 },
          ticks: { stroke: GRID_STROKE },
          size: yAxisSize,
          values: (_u, splits) => splits.map((v) => fmt(v)),
        },
      ],
      series: [
        { label: "Time" },
        ...series.map<uPlot.Series>((s) => ({
          label: s.label,
          stroke: s.color,
          fill: `${s.color}14`,
          width: 1.75,
          spanGaps,
          ...(spanGaps ? { points: { show: true, size: 5 } } : {}),
          value: (_u, v) => fmt(v),
        })),
      ],
    };
    const data: uPlot.AlignedData = [[], ...series.map(() => [])];
    const u = new uPlot(opts, data, el);
    plot.current = u;

    const observer = new ResizeObserver(() => {
      const width = Math.max(el.clientWidth, 200);
      if (width !== u.width) u.setSize({ width, height });
    });
    observer.observe(el);
    return () => {
      observer.disconnect();
      u.destroy();
      plot.current = null;
    };
    // `series` values are pushed by the effect below; only the shape recreates the chart.
  }, [shape]);

  useEffect(() => {
    const u = plot.current;
    if (!u) return;
    u.setData([xs, ...series.map((s) => s.values)]);
  }, [shape, xs, series, xRange]);

  const empty = xs.length === 0;
  return (
    <section className="chart-card" data-testid={testId} data-points={xs.length}>
      <h3 className="chart-title">{title}</h3>
      <div className="chart-body">
        <div ref={container} className="chart-canvas" />
        {empty && <div className="chart-empty">No data in this range</div>}
      </div>
    </section>
  );
}
