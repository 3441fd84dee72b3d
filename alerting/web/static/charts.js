// Small inline SVG charts drawn by hand: a horizontal bar chart of rates and a line chart
// of a telemetry series. Both scale with their container (viewBox) and carry a text
// summary for screen readers.
import { s, h, fmtPercent, fmtNumber, fmtTime } from './common.js';
import { t, label } from './i18n.js';

/** Cut a label to about `px` pixels at 12 px (CJK characters are twice as wide as Latin). */
function clip(text, px) {
  let width = 0;
  for (let i = 0; i < text.length; i++) {
    width += text.charCodeAt(i) > 0x2e7f ? 12 : 6.8;
    if (width > px) return `${text.slice(0, Math.max(1, i - 1))}…`;
  }
  return text;
}

/** rows: [{label, value (0–1 or null), title?}] → horizontal bars with the value as text. */
export function barChart(rows, { title, width = 640, labelWidth = 190 } = {}) {
  const rowH = 22;
  const top = 6;
  const height = top * 2 + Math.max(rows.length, 1) * rowH;
  const barMax = width - labelWidth - 56;
  const summary = rows.map((r) => `${r.label} ${fmtPercent(r.value)}`).join(', ');
  const svg = s('svg', {
    class: 'chart bar-chart', viewBox: `0 0 ${width} ${height}`, role: 'img',
    'aria-label': `${title}: ${summary}`,
  }, s('title', {}, title));
  rows.forEach((row, i) => {
    const y = top + i * rowH;
    const v = row.value;
    const band = v === null || v === undefined ? 'none' : v >= 0.9 ? 'good' : v >= 0.7 ? 'fair' : 'poor';
    svg.append(
      s('text', { x: labelWidth - 6, y: y + 15, class: 'bar-label', 'text-anchor': 'end' },
        s('title', {}, row.title ?? row.label), clip(row.label, labelWidth - 12)),
      s('rect', { x: labelWidth, y: y + 3, width: barMax, height: rowH - 7, class: 'bar-track' }),
      v === null || v === undefined ? null
        : s('rect', { x: labelWidth, y: y + 3, width: Math.max(1, barMax * Math.min(v, 1)), height: rowH - 7, class: `bar bar-${band}` }),
      s('text', { x: labelWidth + barMax + 6, y: y + 15, class: 'bar-value' }, fmtPercent(v)),
    );
  });
  return svg;
}

/** points: [{t (ms), v}] sorted by time → a line with min / max / last labelled. */
export function lineChart(points, { title, width = 360, height = 130, gapMs = Infinity } = {}) {
  const pad = { l: 44, r: 10, t: 18, b: 20 };
  const svg = s('svg', { class: 'chart line-chart', viewBox: `0 0 ${width} ${height}`, role: 'img' });
  const values = points.map((p) => p.v);
  const min = Math.min(...values);
  const max = Math.max(...values);
  const last = points[points.length - 1];
  svg.setAttribute('aria-label', `${title}: ${points.length} · min ${fmtNumber(min)} · max ${fmtNumber(max)} · ${fmtNumber(last.v)} @ ${fmtTime(new Date(last.t).toISOString())}`);
  svg.append(s('title', {}, title));
  const t0 = points[0].t;
  const t1 = Math.max(last.t, t0 + 1);
  const lo = min === max ? min - 1 : min;
  const hi = min === max ? max + 1 : max;
  const x = (tm) => pad.l + ((tm - t0) / (t1 - t0)) * (width - pad.l - pad.r);
  const y = (v) => pad.t + (1 - (v - lo) / (hi - lo)) * (height - pad.t - pad.b);
  for (const v of [lo, (lo + hi) / 2, hi]) {
    svg.append(
      s('line', { x1: pad.l, x2: width - pad.r, y1: y(v), y2: y(v), class: 'grid-line' }),
      s('text', { x: pad.l - 4, y: y(v) + 4, class: 'axis-label', 'text-anchor': 'end' }, fmtNumber(v)),
    );
  }
  let d = '';
  points.forEach((p, i) => {
    const jump = i === 0 || p.t - points[i - 1].t > gapMs;
    d += `${jump ? 'M' : 'L'}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`;
  });
  svg.append(s('path', { d, class: 'series' }));
  if (points.length <= 48) {
    for (const p of points) svg.append(s('circle', { cx: x(p.t), cy: y(p.v), r: 2.2, class: 'series-dot' }));
  }
  const iso = (ms) => new Date(ms).toISOString();
  svg.append(
    s('text', { x: pad.l, y: height - 5, class: 'axis-label' }, fmtTime(iso(t0), { seconds: false })),
    s('text', { x: width - pad.r, y: height - 5, class: 'axis-label', 'text-anchor': 'end' }, fmtTime(iso(t1), { seconds: false })),
    s('text', { x: pad.l, y: 12, class: 'chart-title' }, title),
    s('text', { x: width - pad.r, y: 12, class: 'chart-last', 'text-anchor': 'end' }, fmtNumber(last.v)),
  );
  return svg;
}

const SKIP = new Set(['time', 'bucket', 'seq', 'samples', 'extra']);

/** Telemetry points (raw or bucketed, newest first, as the API answers) → one small line
 *  chart per numeric field that has data; booleans are left out. */
export function telemetryCharts(points, { bucketS = null } = {}) {
  const series = new Map();
  for (const p of points) {
    const tm = new Date(p.bucket ?? p.time).getTime();
    for (const [key, v] of Object.entries(p)) {
      if (SKIP.has(key) || typeof v !== 'number') continue;
      if (!series.has(key)) series.set(key, []);
      series.get(key).push({ t: tm, v });
    }
  }
  const box = h('div', { class: 'charts' });
  if (series.size === 0) {
    box.append(h('p', { class: 'muted' }, t('device.no_data')));
    return box;
  }
  const gapMs = bucketS ? bucketS * 1000 * 2.5 : Infinity;
  for (const [key, pts] of series) {
    pts.sort((a, b) => a.t - b.t);
    box.append(h('figure', { class: 'chart-box', dataset: { metric: key } },
      lineChart(pts, { title: label('metric', key), gapMs })));
  }
  return box;
}
