// The grid map ("一图统揽") as SVG from /api/cells: an equirectangular fit of the cells'
// bounding box, no tiles. Leaf cells are filled by their worst open alarm and hatched
// when they have overdue cases; the cells above them are drawn as outlines, thicker for
// higher levels. Hover or focus shows the counts; click or Enter selects a cell.
import { h, s, SEVERITIES, replace } from './common.js';
import { t, label } from './i18n.js';

const LEVEL_ORDER = ['street', 'community', 'grid', 'micro'];
const MARK = { critical: '▲', major: '◆', minor: '●', warning: '○' };
const SIZE = 1000; // the longer side of the viewBox

function rings(geometry) {
  if (!geometry) return [];
  if (geometry.type === 'Polygon') return geometry.coordinates;
  if (geometry.type === 'MultiPolygon') return geometry.coordinates.flat();
  return [];
}

function outerRings(geometry) {
  if (!geometry) return [];
  if (geometry.type === 'Polygon') return [geometry.coordinates[0]];
  if (geometry.type === 'MultiPolygon') return geometry.coordinates.map((p) => p[0]);
  return [];
}

/** The worst severity with open alarms, 'unknown' when only the total is known, or null. */
export function worstSeverity(props) {
  const by = props.open_alarms_by_severity || {};
  for (const sev of SEVERITIES) if ((by[sev] ?? 0) > 0) return sev;
  return (props.open_alarms ?? 0) > 0 ? 'unknown' : null;
}

export function createGridMap(container, { onSelect }) {
  const tooltip = h('div', { class: 'map-tooltip', role: 'tooltip', hidden: true });
  const svg = s('svg', { class: 'grid-map', testid: 'grid-map', role: 'group', preserveAspectRatio: 'xMidYMid meet' });
  container.append(svg, tooltip);

  let cells = new Map(); // id → properties
  let children = new Map(); // id → [child ids]
  let shapes = new Map(); // id → {path, hatch, marker, centroid}
  let signature = '';
  let selected = null;
  let project = null;

  function index(features) {
    cells = new Map();
    children = new Map();
    for (const f of features) cells.set(f.properties.id, { ...f.properties, geometry: f.geometry });
    for (const c of cells.values()) {
      if (c.parent && cells.has(c.parent)) {
        if (!children.has(c.parent)) children.set(c.parent, []);
        children.get(c.parent).push(c.id);
      }
    }
  }

  function fit(features) {
    let [minX, minY, maxX, maxY] = [Infinity, Infinity, -Infinity, -Infinity];
    for (const f of features) {
      for (const ring of rings(f.geometry)) {
        for (const [lon, lat] of ring) {
          minX = Math.min(minX, lon); maxX = Math.max(maxX, lon);
          minY = Math.min(minY, lat); maxY = Math.max(maxY, lat);
        }
      }
    }
    const kx = Math.cos((((minY + maxY) / 2) * Math.PI) / 180); // metres per degree of longitude shrink
    const w = Math.max((maxX - minX) * kx, 1e-9);
    const hgt = Math.max(maxY - minY, 1e-9);
    const scale = SIZE / Math.max(w, hgt);
    const pad = 8;
    svg.setAttribute('viewBox', `${-pad} ${-pad} ${w * scale + 2 * pad} ${hgt * scale + 2 * pad}`);
    project = ([lon, lat]) => [(lon - minX) * kx * scale, (maxY - lat) * scale];
  }

  function pathData(geometry) {
    return rings(geometry)
      .map((ring) => `M${ring.map((pt) => project(pt).map((v) => v.toFixed(1)).join(',')).join('L')}Z`)
      .join('');
  }

  function centroid(geometry) {
    let best = null;
    for (const ring of outerRings(geometry)) {
      const pts = ring.map(project);
      let a = 0, cx = 0, cy = 0;
      for (let i = 0; i < pts.length - 1; i++) {
        const [x0, y0] = pts[i];
        const [x1, y1] = pts[i + 1];
        const cross = x0 * y1 - x1 * y0;
        a += cross; cx += (x0 + x1) * cross; cy += (y0 + y1) * cross;
      }
      if (!best || Math.abs(a) > Math.abs(best.a)) {
        best = a ? { a, x: cx / (3 * a), y: cy / (3 * a) } : { a, x: pts[0][0], y: pts[0][1] };
      }
    }
    return best ? [best.x, best.y] : [0, 0];
  }

  const isLeaf = (id) => !children.has(id);
  const depth = (c) => Math.max(0, LEVEL_ORDER.indexOf(c.level));

  function describe(c) {
    const sev = worstSeverity(c);
    const parts = [`${c.name} (${label('level', c.level)})`, `${t('map.alarms')} ${c.open_alarms ?? 0}`];
    if (sev && sev !== 'unknown') parts.push(label('severity', sev));
    parts.push(`${t('map.cases')} ${c.open_cases ?? 0}`, `${t('map.overdue_cases')} ${c.overdue_cases ?? 0}`);
    return parts.join(', ');
  }

  function draw(features) {
    fit(features);
    svg.replaceChildren(s('defs', {},
      s('pattern', { id: 'hatch', width: 8, height: 8, patternUnits: 'userSpaceOnUse', patternTransform: 'rotate(45)' },
        s('rect', { width: 3, height: 8, class: 'hatch-stroke' }))));
    shapes = new Map();
    const leaves = s('g', { class: 'leaves' });
    const outlines = s('g', { class: 'outlines' });
    const labels = s('g', { class: 'labels', 'aria-hidden': 'true' });
    const ordered = [...cells.values()].sort((a, b) => depth(b) - depth(a));
    for (const c of ordered) {
      const d = pathData(c.geometry);
      const [cx, cy] = centroid(c.geometry);
      if (isLeaf(c.id)) {
        const path = s('path', {
          d, class: `cell level-${c.level}`, testid: 'cell', 'data-cell-id': c.id,
          tabindex: 0, role: 'button',
        });
        const hatch = s('path', { d, class: 'cell-hatch', 'pointer-events': 'none' });
        const marker = s('text', { x: cx, y: cy + 6, class: 'cell-marker', 'text-anchor': 'middle' });
        leaves.append(path, hatch);
        labels.append(marker);
        shapes.set(c.id, { path, hatch, marker, centroid: [cx, cy] });
      } else {
        const path = s('path', { d, class: `outline level-${c.level}`, 'data-cell-id': c.id });
        outlines.prepend(path); // higher levels last: drawn on top
        shapes.set(c.id, { path, centroid: [cx, cy] });
        if (c.level === 'community' || (c.level === 'grid' && !cells.has(c.parent))) {
          labels.prepend(s('text', { x: cx, y: cy, class: `area-label level-${c.level}`, 'text-anchor': 'middle' }, c.name));
        }
      }
    }
    svg.append(leaves, outlines, labels);
  }

  function paint() {
    const inside = selected ? descendants(selected) : null;
    for (const [id, shape] of shapes) {
      const c = cells.get(id);
      shape.path.classList.toggle('selected', id === selected);
      if (!shape.marker) continue;
      const sev = worstSeverity(c);
      const overdue = (c.overdue_cases ?? 0) > 0;
      shape.path.setAttribute('class', `cell level-${c.level} status-${sev ?? 'ok'}${id === selected ? ' selected' : ''}${inside && !inside.has(id) ? ' outside' : ''}`);
      shape.path.setAttribute('aria-label', describe(c));
      shape.path.setAttribute('aria-pressed', String(id === selected));
      shape.hatch.classList.toggle('on', overdue);
      const n = c.open_alarms ?? 0;
      shape.marker.textContent = n > 0 || overdue ? `${MARK[sev] ?? ''}${n > 0 ? n : ''}${overdue ? ' ⚠' : ''}` : '';
    }
  }

  function showTip(id, clientX, clientY) {
    const c = cells.get(id);
    if (!c) return;
    const by = c.open_alarms_by_severity || {};
    replace(tooltip,
      h('strong', {}, c.name), ' ', h('span', { class: 'muted' }, `${label('level', c.level)} · ${c.id}`),
      h('dl', {},
        h('dt', {}, t('map.alarms')),
        h('dd', {}, String(c.open_alarms ?? 0), ' ',
          SEVERITIES.filter((sv) => by[sv]).map((sv) => h('span', { class: `badge sev sev-${sv}` }, `${MARK[sv]} ${label('severity', sv)} ${by[sv]}`))),
        h('dt', {}, t('map.cases')), h('dd', {}, String(c.open_cases ?? 0)),
        h('dt', {}, t('map.overdue_cases')), h('dd', {}, String(c.overdue_cases ?? 0)),
        h('dt', {}, t('map.devices')), h('dd', {}, String(c.devices ?? 0))));
    tooltip.hidden = false;
    const box = container.getBoundingClientRect();
    const x = Math.min(clientX - box.left + 14, box.width - tooltip.offsetWidth - 4);
    const y = Math.min(clientY - box.top + 14, box.height - tooltip.offsetHeight - 4);
    tooltip.style.left = `${Math.max(4, x)}px`;
    tooltip.style.top = `${Math.max(4, y)}px`;
  }

  const cellOf = (target) => (target && target.closest ? target.closest('[data-testid="cell"]') : null);

  svg.addEventListener('pointermove', (e) => {
    const el = cellOf(e.target);
    if (el) showTip(el.dataset.cellId, e.clientX, e.clientY);
    else tooltip.hidden = true;
  });
  svg.addEventListener('pointerleave', () => { tooltip.hidden = true; });
  svg.addEventListener('click', (e) => {
    const el = cellOf(e.target);
    if (el) onSelect(el.dataset.cellId === selected ? null : el.dataset.cellId);
  });
  svg.addEventListener('keydown', (e) => {
    const el = cellOf(e.target);
    if (el && (e.key === 'Enter' || e.key === ' ')) {
      e.preventDefault();
      onSelect(el.dataset.cellId === selected ? null : el.dataset.cellId);
    }
  });
  svg.addEventListener('focusin', (e) => {
    const el = cellOf(e.target);
    if (!el) return;
    const r = el.getBoundingClientRect();
    showTip(el.dataset.cellId, r.left + r.width / 2, r.top + r.height / 2);
  });
  svg.addEventListener('focusout', () => { tooltip.hidden = true; });

  function descendants(id) {
    const out = new Set([id]);
    const stack = [id];
    while (stack.length) for (const child of children.get(stack.pop()) ?? []) if (!out.has(child)) { out.add(child); stack.push(child); }
    return out;
  }

  function ancestors(id) {
    const out = [];
    for (let c = cells.get(id); c; c = cells.get(c.parent)) out.unshift(c.id);
    return out;
  }

  return {
    update(collection) {
      const features = (collection && collection.features) || [];
      index(features);
      const sig = features.map((f) => f.properties.id).join('|');
      if (sig !== signature) {
        signature = sig;
        draw(features);
      }
      svg.setAttribute('aria-label', t('map.title'));
      paint();
    },
    select(id) {
      selected = id;
      paint();
    },
    relabel: paint,
    cell: (id) => cells.get(id),
    name: (id) => (cells.get(id) ? cells.get(id).name : id ?? '—'),
    descendants,
    ancestors,
  };
}
