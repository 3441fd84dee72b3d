// The operator console: grid map, live alarm feed, case board and case panel,
// statistics and the device view. Data: /api/cells, /api/alarms(+/stream), /api/cases,
// /api/stats, /api/devices. Views are chosen by the URL hash: #/overview, #/stats,
// #/devices/<id>, #/case/<id> (the overview with the case panel open).
import {
  api, post, qs, h, replace, debounce, every, loadConfig, loadMe, onUnauthorized,
  showAuthBanner, loginHref, timeEl, fmtTime, fmtLatLon, fmtPercent, fmtDuration, fmtNumber,
  countdownEl, refreshCountdowns, dueText, severityBadge, alarmStateBadge, caseStateBadge,
  ruleLabel, say, errorText, getTimeZone,
} from './common.js';
import { t, label, setupLangToggle, onLangChange, applyStatic } from './i18n.js';
import { createGridMap } from './map.js';
import { barChart, telemetryCharts } from './charts.js';

const $ = (id) => document.getElementById(id);
const ACTIVE_STATES = 'reported,dispatched,accepted,on_site,resolved,verified';
const OPEN_STATES = ['reported', 'dispatched', 'accepted', 'on_site'];
const FEED_MAX = 300; // alarms kept in memory; closed ones are dropped first
const BOARD_REFRESH_MS = 15000;
const CELLS_REFRESH_MS = 30000;

const state = {
  me: null,
  cell: null, // the selected cell (the feed and the board are filtered to it and below)
  alarms: new Map(), // id → alarm
  fresh: new Set(), // ids changed by the live feed since the last render (highlighted once)
  feedRows: new Map(), // id → {sig, li}
  cases: [],
  openCase: null, // the case shown in the panel
  statsBy: 'cell',
  viewHash: null, // the hash of the view under the case panel
  lastEventId: null,
};

let map = null;

// -- sound: a short beep for critical alarms (WebAudio, no file) -----------------------------

const sound = {
  on: localStorage.getItem('gridwarden.sound') !== 'off',
  ctx: null,
  last: 0,
  unlock() {
    // Browsers start audio only after a user gesture: create/resume on the first one.
    try {
      this.ctx ??= new AudioContext();
      if (this.ctx.state === 'suspended') this.ctx.resume();
    } catch {
      this.ctx = null;
    }
  },
  beep() {
    const now = Date.now();
    if (!this.on || now - this.last < 1500) return;
    this.last = now;
    this.unlock();
    const ctx = this.ctx;
    if (!ctx) return;
    for (const start of [0, 0.25]) {
      const osc = ctx.createOscillator();
      const gain = ctx.createGain();
      osc.type = 'square';
      osc.frequency.value = 880;
      const t0 = ctx.currentTime + start;
      gain.gain.setValueAtTime(0.0001, t0);
      gain.gain.exponentialRampToValueAtTime(0.15, t0 + 0.01);
      gain.gain.exponentialRampToValueAtTime(0.0001, t0 + 0.18);
      osc.connect(gain).connect(ctx.destination);
      osc.start(t0);
      osc.stop(t0 + 0.2);
    }
  },
};

function paintSoundToggle() {
  const btn = $('sound-toggle');
  btn.textContent = `${sound.on ? '♪' : '×'} ${t(sound.on ? 'sound.on' : 'sound.off')}`;
  btn.setAttribute('aria-pressed', String(sound.on));
}

// -- header ----------------------------------------------------------------------------------

function setConn(status) {
  const el = $('conn');
  el.className = `conn conn-${status}`;
  el.dataset.state = status;
  el.textContent = t(`conn.${status}`);
}

function paintClock() {
  const el = $('clock');
  el.textContent = `${fmtTime(new Date().toISOString(), { full: true })}`;
  el.title = getTimeZone();
}

function paintWho() {
  const me = state.me;
  if (!me) return;
  const name = me.worker ? me.worker.name : label('role', me.role);
  replace($('who'), name, ' ', h('button', { type: 'button', class: 'ghost', testid: 'logout', onclick: logout }, t('auth.logout')));
}

async function logout() {
  try {
    await post('/logout');
  } catch {
    // signed out already
  }
  location.href = '/login';
}

// -- views -----------------------------------------------------------------------------------

function route() {
  const [, view = 'overview', arg] = location.hash.match(/^#\/([a-z]+)\/?(.*)$/) ?? [];
  const name = ['overview', 'stats', 'devices', 'case'].includes(view) ? view : 'overview';
  if (name === 'case') {
    // The case panel opens over whichever view is shown (the overview on a fresh load).
    if (!state.viewHash) showView('overview', '#/overview');
    if (arg) openCase(Number(decodeURIComponent(arg)));
    return;
  }
  if ($('case-dialog').open) $('case-dialog').close();
  showView(name, location.hash || '#/overview');
  if (name === 'stats') loadStats();
  if (name === 'devices') showDevice(arg ? decodeURIComponent(arg) : null);
}

function showView(name, hash) {
  state.viewHash = hash;
  for (const el of document.querySelectorAll('.view')) el.hidden = el.dataset.viewName !== name;
  for (const a of document.querySelectorAll('.tabs a')) {
    if (a.dataset.view === name) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

/** Open the case panel through the URL, so it can be linked to and closed with Back. */
const showCase = (id) => { location.hash = `#/case/${id}`; };
const goDevice = (id) => { location.hash = `#/devices/${encodeURIComponent(id)}`; };

// -- the map and the cell filter -----------------------------------------------------------------

async function loadCells() {
  try {
    map.update(await api('/api/cells'));
    paintCellFilter();
  } catch (err) {
    if (err.status !== 401) say(errorText(err), 'error');
  }
}
const loadCellsSoon = debounce(loadCells, 2000);

function selectCell(id) {
  state.cell = id;
  map.select(id);
  paintCellFilter();
  renderFeed();
  if (id) backfillAlarms({ cell: id });
  loadCases();
}

function paintCellFilter() {
  const box = $('cell-filter');
  if (!state.cell) {
    replace(box, h('span', { class: 'muted' }, t('map.whole_city')));
    return;
  }
  const chain = map.ancestors(state.cell);
  replace(box, h('span', {}, t('map.selected')), ' ',
    chain.map((id, i) => [
      i ? h('span', { 'aria-hidden': 'true', class: 'sep' }, '›') : null,
      h('button', {
        type: 'button', class: `crumb${id === state.cell ? ' current' : ''}`,
        'aria-current': id === state.cell ? 'true' : null, onclick: () => selectCell(id),
      }, map.name(id)),
    ]),
    ' ', h('button', { type: 'button', class: 'ghost', testid: 'clear-cell', onclick: () => selectCell(null) }, `✕ ${t('common.clear_filter')}`));
}

const cellName = (id) => (map ? map.name(id) : id);

// -- the live alarm feed --------------------------------------------------------------------------

function upsertAlarm(alarm, { live = false } = {}) {
  const prev = state.alarms.get(alarm.id);
  state.alarms.set(alarm.id, alarm);
  if (live) state.fresh.add(alarm.id);
  const critical = alarm.severity === 'critical' && alarm.state === 'active';
  if (live && critical && (!prev || prev.severity !== 'critical' || prev.state !== 'active')) {
    sound.beep();
    $('announcer').textContent = t('feed.announce', { rule: ruleLabel(alarm.rule), cell: cellName(alarm.cell_id) });
  }
}

function pruneAlarms() {
  if (state.alarms.size <= FEED_MAX) return;
  const ids = [...state.alarms.values()]
    .sort((a, b) => (a.state === 'closed') - (b.state === 'closed') || b.id - a.id)
    .slice(FEED_MAX)
    .map((a) => a.id);
  for (const id of ids) state.alarms.delete(id);
}

async function backfillAlarms(filter = {}) {
  try {
    const [open, recent] = await Promise.all([
      api(`/api/alarms${qs({ ...filter, state: 'active,acknowledged,cleared', limit: 200 })}`),
      api(`/api/alarms${qs({ ...filter, limit: 50 })}`),
    ]);
    for (const a of [...open.items, ...recent.items]) if (!state.alarms.has(a.id)) upsertAlarm(a);
    pruneAlarms();
    renderFeed();
  } catch (err) {
    if (err.status !== 401) say(errorText(err), 'error');
  }
}

function visibleAlarms() {
  const showClosed = $('feed-closed').checked;
  const severity = $('feed-severity').value;
  const inside = state.cell ? map.descendants(state.cell) : null;
  return [...state.alarms.values()]
    .filter((a) => (showClosed || a.state !== 'closed')
      && (!severity || a.severity === severity)
      && (!inside || inside.has(a.cell_id)))
    .sort((a, b) => b.id - a.id);
}

function alarmRow(a) {
  const ackable = a.state === 'active' || a.state === 'cleared';
  const flash = a.severity === 'critical' && a.state === 'active';
  return h('li', {
    class: `alarm sev-row-${a.severity} astate-row-${a.state}${flash ? ' flash' : ''}${state.fresh.delete(a.id) ? ' fresh' : ''}`,
    testid: 'alarm-row', 'data-alarm-id': a.id, 'data-severity': a.severity, 'data-state': a.state,
  },
  h('div', { class: 'alarm-main' },
    severityBadge(a.severity), ' ',
    h('strong', { class: 'alarm-rule', title: a.rule }, ruleLabel(a.rule)), ' ',
    alarmStateBadge(a.state),
    a.count > 1 ? h('span', { class: 'muted count' }, ` ${t('feed.count', { n: a.count })}`) : null),
  h('div', { class: 'alarm-meta' },
    h('button', { type: 'button', class: 'link', testid: 'alarm-device', onclick: () => goDevice(a.device_id) }, a.device_id),
    h('span', { class: 'cell-name' }, cellName(a.cell_id)),
    timeEl(a.first_seen),
    a.last_seen && a.last_seen !== a.first_seen ? h('span', { class: 'muted' }, '→ ', timeEl(a.last_seen)) : null),
  h('div', { class: 'alarm-actions' },
    a.case_id ? h('button', { type: 'button', class: 'link', testid: 'alarm-case', onclick: () => showCase(a.case_id) }, t('feed.case', { id: a.case_id })) : null,
    ackable ? h('button', { type: 'button', class: 'small', testid: 'action-ack', onclick: (e) => ack(a.id, e.currentTarget) }, t('action.ack')) : null));
}

function renderFeed() {
  const list = $('alarm-feed');
  const focused = document.activeElement && list.contains(document.activeElement)
    ? [document.activeElement.closest('[data-alarm-id]')?.dataset.alarmId, document.activeElement.dataset.testid]
    : null;
  const rows = [];
  const seen = new Set();
  for (const a of visibleAlarms()) {
    const sig = `${a.state}|${a.severity}|${a.count}|${a.last_seen}|${a.case_id}|${cellName(a.cell_id)}`;
    let entry = state.feedRows.get(a.id);
    if (!entry || entry.sig !== sig) {
      entry = { sig, li: alarmRow(a) };
      state.feedRows.set(a.id, entry);
    }
    seen.add(a.id);
    rows.push(entry.li);
  }
  for (const id of state.feedRows.keys()) if (!seen.has(id)) state.feedRows.delete(id);
  if (rows.length === 0) rows.push(h('li', { class: 'empty muted' }, t('feed.empty')));
  list.replaceChildren(...rows);
  if (focused && focused[0]) {
    list.querySelector(`[data-alarm-id="${focused[0]}"] [data-testid="${focused[1]}"]`)?.focus();
  }
}
const renderFeedSoon = debounce(renderFeed, 150);

async function ack(id, button) {
  button.disabled = true;
  try {
    upsertAlarm(await post(`/api/alarms/${id}/ack`));
    say(t('common.done', { what: t('action.ack') }));
  } catch (err) {
    say(errorText(err), 'error');
    if (err.status === 409) {
      try { upsertAlarm(await api(`/api/alarms/${id}`)); } catch { /* shown above */ }
    }
  }
  button.disabled = false;
  renderFeed();
  loadCellsSoon();
}

function connectFeed() {
  setConn('connecting');
  const since = state.lastEventId ? qs({ since: state.lastEventId }) : '';
  const source = new EventSource(`/api/alarms/stream${since}`);
  source.addEventListener('open', () => setConn('live'));
  source.addEventListener('alarm', (e) => {
    if (e.lastEventId) state.lastEventId = e.lastEventId;
    try {
      upsertAlarm(JSON.parse(e.data), { live: true });
    } catch {
      return;
    }
    pruneAlarms();
    renderFeedSoon();
    loadCellsSoon();
  });
  source.addEventListener('case', (e) => {
    let c = null;
    try { c = JSON.parse(e.data); } catch { /* refresh anyway */ }
    loadCasesSoon();
    loadCellsSoon();
    if (c && state.openCase && c.id === state.openCase.id) refreshOpenCaseSoon();
  });
  source.addEventListener('error', () => {
    setConn('lost');
    if (source.readyState === EventSource.CLOSED) {
      // The browser gave up (e.g. 401 or the server stopping): check the session, retry.
      source.close();
      setTimeout(async () => {
        try { await api('/api/me'); } catch { /* the banner says so */ }
        connectFeed();
        loadCases();
      }, 5000);
    }
  });
}

// -- the case board ----------------------------------------------------------------------------

function boardQuery() {
  const form = $('board-filters');
  const stateValue = form.elements.state.value;
  return {
    state: stateValue === 'active' ? ACTIVE_STATES : stateValue,
    priority: form.elements.priority.value,
    worker: form.elements.worker.value.trim(),
    cell: state.cell,
    limit: 200,
  };
}

async function loadCases() {
  try {
    const data = await api(`/api/cases${qs(boardQuery())}`);
    state.cases = data.items;
    renderBoard();
  } catch (err) {
    if (err.status !== 401) say(errorText(err), 'error');
  }
}
const loadCasesSoon = debounce(loadCases, 800);

function renderBoard() {
  const overdueOnly = $('board-filters').elements.overdue.checked;
  const now = Date.now();
  const late = (c) => dueText(c, now).overdue;
  const cases = overdueOnly ? state.cases.filter(late) : state.cases;
  $('board-count').textContent = t('board.count', { n: cases.length, late: cases.filter(late).length });
  const rows = cases.map((c) => h('tr', {
    testid: 'case-row', 'data-case-id': c.id, 'data-state': c.state,
    class: `${late(c) ? 'late' : ''}${state.openCase && state.openCase.id === c.id ? ' current' : ''}`,
  },
  h('td', {}, h('button', { type: 'button', class: 'link', testid: 'case-open', onclick: () => showCase(c.id) }, `#${c.id}`)),
  h('td', {}, severityBadge(c.priority)),
  h('td', {}, caseStateBadge(c.state)),
  h('td', { class: 'title-cell', title: c.title ?? '' }, c.title ?? ruleLabel(c.category)),
  h('td', { class: 'wrap' }, cellName(c.cell_id)),
  h('td', { title: label('level', c.level) }, c.assignee ?? t('common.unassigned')),
  h('td', {}, OPEN_STATES.includes(c.state) ? countdownEl(c) : '—'),
  h('td', {}, timeEl(c.created_at)),
  h('td', { class: 'num' }, String(c.escalations ?? 0))));
  if (rows.length === 0) rows.push(h('tr', {}, h('td', { colspan: 9, class: 'empty muted' }, t('board.empty'))));
  $('case-rows').replaceChildren(...rows);
}

// -- the case panel ----------------------------------------------------------------------------

function whoLabel(who) {
  if (!who || who === 'system') return t('who.system');
  const m = /^(operator|admin):(\d+)$/.exec(who);
  return m ? t(`who.${m[1]}`, { id: m[2] }) : who;
}

function detailText(key, value) {
  if (value === null || value === undefined || value === '') return null;
  if (['level', 'from_level', 'to_level'].includes(key)) return label('level', value);
  if (key === 'rule') return ruleLabel(value);
  if (key === 'missed') return label('due', value);
  return typeof value === 'object' ? JSON.stringify(value) : String(value);
}

function timeline(events) {
  return h('ol', { class: 'timeline', testid: 'case-timeline' }, events.map((e) => h('li', { 'data-action': e.action },
    timeEl(e.at, { full: true }), ' ',
    h('strong', {}, label('action', e.action)), ' ',
    h('span', { class: 'who' }, whoLabel(e.who)),
    e.from !== e.to && e.to ? h('span', { class: 'transition' }, ' ', e.from ? caseStateBadge(e.from) : null, ' → ', caseStateBadge(e.to)) : null,
    h('ul', { class: 'detail' }, Object.entries(e.detail || {}).map(([k, v]) => {
      const text = detailText(k, v);
      return text === null ? null : h('li', {}, `${label('detail', k)}: ${text}`);
    })))));
}

/** The operator's actions for the case's state: {name, fields:[{name, kind, testid, required}]} */
function operatorActions(c) {
  const out = [];
  if (c.state === 'resolved') out.push({ name: 'verify', fields: [{ name: 'note', label: 'field.note_optional' }] });
  if (c.state === 'resolved' || c.state === 'verified') out.push({ name: 'reopen', fields: [{ name: 'reason', label: 'field.reason', required: true }] });
  if (c.state === 'verified') out.push({ name: 'archive', fields: [] });
  if (c.state === 'archived' && (c.rating === null || c.rating === undefined)) {
    out.push({ name: 'rate', fields: [{ name: 'score', label: 'field.score', kind: 'score', required: true }, { name: 'comment', label: 'field.comment' }] });
  }
  if (OPEN_STATES.includes(c.state)) {
    out.push({ name: 'reassign', fields: [{ name: 'worker_id', label: 'field.worker_id', required: true }] });
    out.push({ name: 'escalate', fields: [{ name: 'reason', label: 'field.reason' }] });
  }
  return out;
}

function actionForm(c, action) {
  const inputs = action.fields.map((f) => {
    const testid = `${action.name}-${f.name.replace('_', '-')}`;
    const input = f.kind === 'score'
      ? h('select', { name: f.name, testid, required: true }, [5, 4, 3, 2, 1].map((n) => h('option', { value: n }, `${n} ${'★'.repeat(n)}`)))
      : h('input', { name: f.name, testid, required: f.required, autocomplete: 'off', maxlength: 2000 });
    return h('label', {}, h('span', {}, t(f.label)), input);
  });
  const form = h('form', { class: `action-form action-${action.name}`, 'data-action': action.name },
    inputs,
    h('button', { type: 'submit', testid: `action-${action.name}`, class: action.name === 'reopen' || action.name === 'escalate' ? 'warn' : 'primary' }, t(`action.${action.name}`)));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const body = {};
    for (const f of action.fields) {
      const raw = form.elements[f.name].value.trim();
      if (raw) body[f.name] = f.kind === 'score' ? Number(raw) : raw;
    }
    const button = form.querySelector('button');
    button.disabled = true;
    try {
      const updated = await post(`/api/cases/${c.id}/${action.name}`, body);
      form.reset();
      renderCase(updated, { force: true });
      say(t('common.done', { what: `${t(`action.${action.name}`)} #${c.id}` }));
      loadCases();
      loadCellsSoon();
    } catch (err) {
      say(errorText(err), 'error');
      showCaseError(err);
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

function showCaseError(err) {
  const box = $('case-dialog').querySelector('.case-error');
  if (box) box.textContent = errorText(err);
}

function caseSignature(c) {
  return JSON.stringify([c.state, c.assignee, c.due_at, c.rating, c.escalations, (c.timeline || []).length]);
}

function renderCase(c, { force = false } = {}) {
  const dialog = $('case-dialog');
  const sig = caseSignature(c);
  if (!force && state.openCase && state.openCase.id === c.id && state.openCase.sig === sig && dialog.firstChild) return;
  // Keep what the operator has typed into the action forms.
  const drafts = new Map([...dialog.querySelectorAll('input, select')].map((el) => [el.dataset.testid, el.value]));
  state.openCase = { id: c.id, sig, json: c };
  const loc = c.location || {};
  const row = (key, ...value) => [h('dt', {}, t(key)), h('dd', {}, ...value)];
  const actions = operatorActions(c);
  replace(dialog,
    h('header', { class: 'dialog-head' },
      h('h2', { id: 'case-dialog-title' }, t('case.title', { id: c.id }), ' ', severityBadge(c.priority), ' ', caseStateBadge(c.state)),
      h('button', { type: 'button', class: 'ghost', testid: 'case-close', onclick: () => dialog.close() }, `✕ ${t('common.close')}`)),
    h('p', { class: 'case-title' }, c.title ?? c.category),
    h('div', { class: 'case-body' },
      h('section', { 'aria-labelledby': 'case-details-h' },
        h('h3', { id: 'case-details-h' }, t('case.details')),
        h('dl', { class: 'facts' },
          row('case.state', caseStateBadge(c.state)),
          row('case.priority', severityBadge(c.priority)),
          row('case.level', label('level', c.level)),
          row('case.cell', cellName(c.cell_id), h('span', { class: 'muted' }, ` (${c.cell_id ?? '—'})`)),
          row('case.assignee', c.assignee ?? t('common.unassigned')),
          row('case.created', timeEl(c.created_at, { full: true })),
          row('case.due', OPEN_STATES.includes(c.state) ? [countdownEl(c), ' ', c.due_at ? h('span', { class: 'muted' }, timeEl(c.due_at)) : null] : '—'),
          row('case.category', ruleLabel(c.category)),
          row('case.origin', label('origin', c.origin)),
          row('case.device', c.device_id ? h('button', { type: 'button', class: 'link', onclick: () => { dialog.close(); goDevice(c.device_id); } }, c.device_id) : '—'),
          row('case.location', fmtLatLon(loc.lat, loc.lon)),
          row('case.alarms', (c.alarm_ids || []).join(', ') || '—'),
          row('case.escalations', String(c.escalations ?? 0)),
          row('case.rating', c.rating ? `${'★'.repeat(c.rating)} (${c.rating})` : '—'))),
      h('section', { 'aria-labelledby': 'case-actions-h', class: 'case-actions' },
        h('h3', { id: 'case-actions-h' }, t('case.actions')),
        actions.length ? actions.map((a) => actionForm(c, a)) : h('p', { class: 'muted' }, t('case.no_actions')),
        h('p', { class: 'case-error error', role: 'alert' })),
      h('section', { 'aria-labelledby': 'case-timeline-h', class: 'case-timeline' },
        h('h3', { id: 'case-timeline-h' }, t('case.timeline')),
        timeline(c.timeline || []))));
  for (const [testid, value] of drafts) {
    const el = testid && dialog.querySelector(`[data-testid="${testid}"]`);
    if (el && value) el.value = value;
  }
  renderBoard();
}

async function openCase(id) {
  if (!Number.isInteger(id) || id < 1) return;
  const dialog = $('case-dialog');
  if (!state.openCase || state.openCase.id !== id) {
    state.openCase = null;
    replace(dialog, h('p', { class: 'muted' }, t('common.loading')));
  }
  if (!dialog.open) dialog.showModal();
  try {
    renderCase(await api(`/api/cases/${id}`));
  } catch (err) {
    replace(dialog, h('p', { class: 'error' }, errorText(err)),
      h('button', { type: 'button', onclick: () => dialog.close() }, t('common.close')));
  }
}

async function refreshOpenCase() {
  if (!state.openCase || !$('case-dialog').open) return;
  try {
    renderCase(await api(`/api/cases/${state.openCase.id}`));
  } catch { /* keep what is shown */ }
}
const refreshOpenCaseSoon = debounce(refreshOpenCase, 500);

// -- statistics --------------------------------------------------------------------------------

async function loadStats() {
  const days = Number($('stats-range').value);
  const since = new Date(Date.now() - days * 86400000).toISOString();
  for (const b of document.querySelectorAll('[data-by]')) b.setAttribute('aria-pressed', String(b.dataset.by === state.statsBy));
  try {
    renderStats(await api(`/api/stats${qs({ by: state.statsBy, since })}`));
  } catch (err) {
    if (err.status !== 401) say(errorText(err), 'error');
  }
}

function renderStats(data) {
  state.stats = data;
  const byCell = data.by === 'cell';
  const keyName = (k) => (k === null ? t('common.unassigned') : byCell ? cellName(k) : k);
  $('stats-window').textContent = t('stats.window', { since: fmtTime(data.since, { full: true, seconds: false }), until: fmtTime(data.until, { full: true, seconds: false }) });
  const items = data.items;
  const bars = (field) => (items.length
    ? barChart(items.map((r) => ({ label: keyName(r.key), title: `${keyName(r.key)} (${r.key ?? '—'}): ${fmtPercent(r[field])}`, value: r[field] })), { title: t(`stats.${field}`) })
    : h('p', { class: 'muted' }, t('stats.empty')));
  replace($('chart-disposal'), bars('disposal_rate'));
  replace($('chart-sla'), bars('sla_compliance'));
  const pair = (p) => `${fmtDuration(p && p.median)} / ${fmtDuration(p && p.p90)}`;
  replace($('stats-head'), h('tr', {},
    h('th', { scope: 'col' }, t(byCell ? 'stats.key_cell' : 'stats.key_worker')),
    ['stats.cases', 'stats.disposed', 'stats.disposal_rate', 'stats.sla_compliance'].map((k) => h('th', { scope: 'col', class: 'num' }, t(k))),
    ['stats.accept', 'stats.arrive', 'stats.resolve'].map((k) => h('th', { scope: 'col', class: 'num' }, t(k), h('br'), h('small', {}, t('stats.median_p90')))),
    h('th', { scope: 'col', class: 'num' }, t('stats.escalations')),
    h('th', { scope: 'col', class: 'num' }, t('stats.rating'))));
  const cells = (r) => [
    h('td', { class: 'num' }, String(r.cases)), h('td', { class: 'num' }, String(r.disposed)),
    h('td', { class: 'num' }, fmtPercent(r.disposal_rate)), h('td', { class: 'num' }, fmtPercent(r.sla_compliance)),
    h('td', { class: 'num' }, pair(r.accept_s)), h('td', { class: 'num' }, pair(r.arrive_s)), h('td', { class: 'num' }, pair(r.resolve_s)),
    h('td', { class: 'num' }, String(r.escalations)), h('td', { class: 'num' }, fmtNumber(r.rating_avg, 2)),
  ];
  replace($('stats-rows'), items.length
    ? items.map((r) => h('tr', { testid: 'stats-row', 'data-key': r.key ?? '' }, h('th', { scope: 'row' }, keyName(r.key), byCell && r.key ? h('span', { class: 'muted' }, ` ${r.key}`) : null), cells(r)))
    : h('tr', {}, h('td', { colspan: 10, class: 'empty muted' }, t('stats.empty'))));
  replace($('stats-foot'), h('tr', {}, h('th', { scope: 'row' }, t('stats.total')), cells(data.total)));
}

// -- devices ----------------------------------------------------------------------------------

const RANGES = [[1, 60], [6, 300], [24, 3600], [168, 21600]]; // hours, bucket seconds
let deviceListLoaded = false;

async function fillDeviceList() {
  if (deviceListLoaded) return;
  deviceListLoaded = true;
  try {
    const data = await api('/api/devices?limit=1000');
    replace($('device-list'), data.items.map((d) => h('option', { value: d.id }, `${d.name ?? ''} ${label('kind', d.kind)}`)));
  } catch {
    deviceListLoaded = false;
  }
}

async function showDevice(id) {
  fillDeviceList();
  const box = $('device-detail');
  $('device-form').elements.id.value = id ?? '';
  if (!id) {
    replace(box, h('p', { class: 'muted' }, t('device.pick')));
    return;
  }
  replace(box, h('p', { class: 'muted' }, t('common.loading')));
  let d;
  try {
    d = await api(`/api/devices/${encodeURIComponent(id)}`);
  } catch (err) {
    replace(box, h('p', { class: 'error' }, err.status === 404 ? t('device.not_found', { id }) : errorText(err)));
    return;
  }
  const row = (key, ...value) => [h('dt', {}, t(key)), h('dd', {}, ...value)];
  const range = h('select', { testid: 'device-range' }, RANGES.map(([hours]) => h('option', { value: hours, selected: hours === 24 }, t(`device.range.${hours}`))));
  const charts = h('div', { testid: 'telemetry-chart' });
  const alarms = h('div');
  replace(box,
    h('h3', {}, d.name ?? d.id, ' ', h('span', { class: 'muted' }, d.id)),
    h('dl', { class: 'facts wide' },
      row('device.kind', label('kind', d.kind)),
      row('device.cell', cellName(d.cell_id), h('span', { class: 'muted' }, ` (${d.cell_id ?? '—'})`)),
      row('device.location', fmtLatLon(d.lat, d.lon)),
      row('device.building', [d.building, d.floor].filter((v) => v !== null && v !== undefined).join(' / ') || '—'),
      row('device.interval', d.interval_s ? fmtDuration(d.interval_s) : '—'),
      row('device.last_seen', timeEl(d.last_seen, { full: true })),
      row('device.status', d.status ? h('span', { class: `badge status-${d.status}` }, label('status', d.status)) : '—')),
    h('section', { class: 'device-history' },
      h('div', { class: 'panel-head' }, h('h3', {}, t('device.history')), h('label', {}, h('span', {}, t('device.range')), range)),
      charts),
    h('section', {}, h('h3', {}, t('device.recent_alarms')), alarms));
  const loadHistory = async () => {
    const [hours, bucket] = RANGES.find(([hr]) => hr === Number(range.value));
    const since = new Date(Date.now() - hours * 3600000).toISOString();
    try {
      const data = await api(`/api/devices/${encodeURIComponent(id)}/telemetry${qs({ bucket, since, limit: 2000 })}`);
      replace(charts, telemetryCharts(data.points, { bucketS: bucket }));
    } catch (err) {
      replace(charts, h('p', { class: 'error' }, errorText(err)));
    }
  };
  range.addEventListener('change', loadHistory);
  loadHistory();
  try {
    const list = await api(`/api/alarms${qs({ device: id, limit: 20 })}`);
    replace(alarms, list.items.length ? h('ul', { class: 'plain' }, list.items.map((a) => h('li', {},
      severityBadge(a.severity), ' ', ruleLabel(a.rule), ' ', alarmStateBadge(a.state), ' ', timeEl(a.first_seen),
      a.case_id ? [' ', h('button', { type: 'button', class: 'link', onclick: () => showCase(a.case_id) }, t('feed.case', { id: a.case_id }))] : null)))
      : h('p', { class: 'muted' }, t('feed.empty')));
  } catch (err) {
    replace(alarms, h('p', { class: 'error' }, errorText(err)));
  }
}

// -- start ---------------------------------------------------------------------------------------

function wire() {
  setupLangToggle($('lang-toggle'));
  $('sound-toggle').addEventListener('click', () => {
    sound.on = !sound.on;
    localStorage.setItem('gridwarden.sound', sound.on ? 'on' : 'off');
    if (sound.on) sound.unlock();
    paintSoundToggle();
  });
  for (const type of ['pointerdown', 'keydown']) document.addEventListener(type, () => sound.unlock(), { once: true });
  $('feed-closed').addEventListener('change', renderFeed);
  $('feed-severity').addEventListener('change', renderFeed);
  const filters = $('board-filters');
  filters.addEventListener('submit', (e) => { e.preventDefault(); loadCases(); });
  filters.elements.state.addEventListener('change', loadCases);
  filters.elements.priority.addEventListener('change', loadCases);
  filters.elements.worker.addEventListener('input', debounce(loadCases, 400));
  filters.elements.overdue.addEventListener('change', renderBoard);
  for (const b of document.querySelectorAll('[data-by]')) {
    b.addEventListener('click', () => { state.statsBy = b.dataset.by; loadStats(); });
  }
  $('stats-range').addEventListener('change', loadStats);
  $('device-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const id = e.currentTarget.elements.id.value.trim();
    if (id) goDevice(id);
  });
  $('case-dialog').addEventListener('close', () => {
    state.openCase = null;
    renderBoard();
    if (location.hash.startsWith('#/case/')) history.replaceState(null, '', state.viewHash || '#/overview');
  });
  window.addEventListener('hashchange', route);
  onLangChange(() => {
    paintSoundToggle();
    paintWho();
    setConn($('conn').dataset.state || 'connecting');
    paintCellFilter();
    map.relabel();
    state.feedRows.clear();
    renderFeed();
    renderBoard();
    if (state.openCase) renderCase(state.openCase.json, { force: true });
    if (state.stats) renderStats(state.stats);
    if (!$('view-devices').hidden) route();
  });
}

async function main() {
  applyStatic();
  wire();
  paintSoundToggle();
  onUnauthorized(() => showAuthBanner(t('auth.needed'), t('auth.login'), loginHref()));
  map = createGridMap($('map'), { onSelect: selectCell });
  paintCellFilter();
  await loadConfig();
  setInterval(paintClock, 1000);
  paintClock();
  try {
    state.me = await loadMe();
  } catch {
    return; // not signed in: the banner says so
  }
  paintWho();
  if (state.me.role === 'worker') {
    showAuthBanner(t('auth.worker_here'), t('auth.worker_link'), '/worker');
    return;
  }
  await loadCells();
  connectFeed();
  backfillAlarms();
  every(BOARD_REFRESH_MS, loadCases);
  every(CELLS_REFRESH_MS, loadCells);
  setInterval(() => {
    refreshCountdowns();
    if ($('board-filters').elements.overdue.checked) renderBoard();
  }, 1000);
  route();
}

main();
