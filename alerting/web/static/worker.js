// The grid worker's phone view: my open cases (dispatched, accepted, on site), refreshed
// every 10 s, with accept / reject (reason) / arrive / resolve (note), a countdown to the
// next deadline, a geo: link, and on demand the timeline and the device's recent data.
import {
  api, post, qs, h, replace, every, loadConfig, loadMe, onUnauthorized, showAuthBanner,
  loginHref, timeEl, fmtTime, fmtLatLon, countdownEl, refreshCountdowns, severityBadge,
  caseStateBadge, ruleLabel, geoUri, say, errorText,
} from './common.js';
import { t, label, setupLangToggle, onLangChange, applyStatic } from './i18n.js';
import { telemetryCharts } from './charts.js';

const $ = (id) => document.getElementById(id);
const MY_STATES = 'dispatched,accepted,on_site';
const REFRESH_MS = 10000;
const HISTORY_HOURS = 6;
const HISTORY_BUCKET_S = 300;

const state = {
  me: null,
  cases: [],
  cards: new Map(), // id → {sig, li}
  drafts: new Map(), // `${id}:${field}` → text typed but not yet sent
  expanded: new Set(), // ids whose details are open
  cellNames: new Map(),
};

const cellName = (id) => state.cellNames.get(id) ?? id ?? '—';

function whoLabel(who) {
  if (!who || who === 'system') return t('who.system');
  const m = /^(operator|admin):(\d+)$/.exec(who);
  if (m) return t(`who.${m[1]}`, { id: m[2] });
  return state.me && state.me.worker && who === state.me.worker.id ? state.me.worker.name : who;
}

// -- loading -------------------------------------------------------------------------------

async function loadCellNames() {
  try {
    const cells = await api('/api/cells');
    for (const f of cells.features || []) state.cellNames.set(f.properties.id, f.properties.name);
  } catch {
    // names are a nicety: ids are shown without them
  }
}

async function refresh() {
  try {
    const data = await api(`/api/cases${qs({ state: MY_STATES, limit: 100 })}`);
    // The most urgent first: the nearest deadline (an overdue one is nearest of all).
    const due = (c) => (c.due_at ? new Date(c.due_at).getTime() : Infinity);
    state.cases = data.items.sort((a, b) => due(a) - due(b) || b.id - a.id);
    $('updated').textContent = t('common.updated', { time: fmtTime(new Date().toISOString()) });
    render();
  } catch (err) {
    if (err.status !== 401) say(errorText(err), 'error');
  }
}

// -- cards ---------------------------------------------------------------------------------

const signature = (c) => JSON.stringify([c.state, c.due_at, c.due_step, c.assignee, c.priority, c.title, c.escalations, state.expanded.has(c.id)]);

function draftInput(c, field, el) {
  const key = `${c.id}:${field}`;
  el.value = state.drafts.get(key) ?? '';
  el.addEventListener('input', () => state.drafts.set(key, el.value));
  return el;
}

async function act(c, action, body, button) {
  button.disabled = true;
  try {
    const updated = await post(`/api/cases/${c.id}/${action}`, body);
    for (const field of ['reason', 'note']) state.drafts.delete(`${c.id}:${field}`);
    say(t('common.done', { what: `${t(`action.${action}`)} #${c.id}` }));
    if (!MY_STATES.split(',').includes(updated.state) || (state.me.worker && updated.assignee !== state.me.worker.id)) {
      state.expanded.delete(c.id);
    }
    await refresh();
  } catch (err) {
    say(errorText(err), 'error');
    button.disabled = false;
    refresh();
  }
}

function requireText(c, field, input, fieldLabel) {
  const text = input.value.trim();
  if (!text) {
    say(t('field.required', { field: t(fieldLabel) }), 'error');
    input.focus();
    return null;
  }
  return text;
}

function actions(c) {
  if (c.state === 'dispatched') {
    const reason = draftInput(c, 'reason', h('input', { id: `reason-${c.id}`, testid: 'reject-reason', autocomplete: 'off', maxlength: 2000 }));
    return [
      h('button', { type: 'button', class: 'primary', testid: 'action-accept', onclick: (e) => act(c, 'accept', {}, e.currentTarget) }, t('action.accept')),
      h('label', { class: 'field', for: `reason-${c.id}` }, t('field.reason')),
      h('div', { class: 'row' }, reason,
        h('button', {
          type: 'button', class: 'warn', testid: 'action-reject',
          onclick: (e) => {
            const text = requireText(c, 'reason', reason, 'field.reason');
            if (text) act(c, 'reject', { reason: text }, e.currentTarget);
          },
        }, t('action.reject'))),
    ];
  }
  if (c.state === 'accepted') {
    return [h('button', { type: 'button', class: 'primary', testid: 'action-arrive', onclick: (e) => act(c, 'arrive', {}, e.currentTarget) }, t('action.arrive'))];
  }
  if (c.state === 'on_site') {
    const note = draftInput(c, 'note', h('textarea', { id: `note-${c.id}`, testid: 'resolve-note', maxlength: 2000, rows: 3 }));
    return [
      h('label', { class: 'field', for: `note-${c.id}` }, t('field.note')),
      note,
      h('button', {
        type: 'button', class: 'primary', testid: 'action-resolve',
        onclick: (e) => {
          const text = requireText(c, 'note', note, 'field.note');
          if (text) act(c, 'resolve', { note: text }, e.currentTarget);
        },
      }, t('action.resolve')),
    ];
  }
  return [];
}

function card(c) {
  const loc = c.location || {};
  const hasLoc = loc.lat !== null && loc.lat !== undefined;
  const open = state.expanded.has(c.id);
  const more = h('div', { class: 'more', id: `more-${c.id}`, hidden: !open });
  const toggle = h('button', {
    type: 'button', class: 'link', testid: 'case-details', 'aria-expanded': String(open), 'aria-controls': `more-${c.id}`,
    onclick: () => {
      if (state.expanded.has(c.id)) state.expanded.delete(c.id);
      else state.expanded.add(c.id);
      render();
    },
  }, t(open ? 'case.hide_details' : 'case.show_details'));
  const article = h('article', {
    class: `card prio-${c.priority}`, testid: 'my-case', 'data-case-id': c.id, 'data-state': c.state,
    'aria-labelledby': `case-h-${c.id}`,
  },
  h('div', { class: 'badges' }, severityBadge(c.priority), caseStateBadge(c.state), h('span', { class: 'case-no' }, `#${c.id}`)),
  h('h2', { id: `case-h-${c.id}` }, c.title ?? ruleLabel(c.category)),
  h('p', { class: 'due' }, countdownEl(c)),
  h('dl', { class: 'meta' },
    h('dt', {}, t('case.cell')), h('dd', {}, cellName(c.cell_id)),
    h('dt', {}, t('case.location')), h('dd', {}, fmtLatLon(loc.lat, loc.lon), hasLoc ? [' · ', h('a', { href: geoUri(loc.lat, loc.lon), testid: 'geo-link' }, t('case.map_link'))] : null),
    c.device_id ? [h('dt', {}, t('case.device')), h('dd', {}, c.device_id)] : null,
    h('dt', {}, t('case.created')), h('dd', {}, timeEl(c.created_at))),
  h('div', { class: 'card-actions' }, actions(c)),
  toggle,
  more);
  if (open) loadMore(c, more);
  return h('li', {}, article);
}

async function loadMore(c, box) {
  replace(box, h('p', { class: 'muted' }, t('common.loading')));
  const timelineBox = h('div');
  const historyBox = h('div', { testid: 'device-history' });
  replace(box, h('h3', {}, t('case.timeline')), timelineBox, c.device_id ? [h('h3', {}, t('case.history')), historyBox] : null);
  try {
    const full = await api(`/api/cases/${c.id}`);
    replace(timelineBox, h('ol', { class: 'timeline' }, (full.timeline || []).map((e) => h('li', {},
      timeEl(e.at), ' ', h('strong', {}, label('action', e.action)), ' ', h('span', { class: 'who' }, whoLabel(e.who)),
      e.detail && (e.detail.reason || e.detail.note) ? h('div', { class: 'detail' }, e.detail.reason || e.detail.note) : null))));
  } catch (err) {
    replace(timelineBox, h('p', { class: 'error' }, errorText(err)));
  }
  if (!c.device_id) return;
  try {
    const since = new Date(Date.now() - HISTORY_HOURS * 3600000).toISOString();
    const data = await api(`/api/devices/${encodeURIComponent(c.device_id)}/telemetry${qs({ since, bucket: HISTORY_BUCKET_S })}`);
    replace(historyBox, telemetryCharts(data.points, { bucketS: HISTORY_BUCKET_S }));
  } catch (err) {
    replace(historyBox, h('p', { class: 'error' }, errorText(err)));
  }
}

function render() {
  const list = $('my-cases');
  const active = document.activeElement;
  const focusKey = active && list.contains(active)
    ? [active.closest('[data-case-id]')?.dataset.caseId, active.dataset.testid] : null;
  const items = [];
  const seen = new Set();
  for (const c of state.cases) {
    const sig = signature(c);
    let entry = state.cards.get(c.id);
    if (!entry || entry.sig !== sig) {
      entry = { sig, li: card(c) };
      state.cards.set(c.id, entry);
    }
    seen.add(c.id);
    items.push(entry.li);
  }
  for (const id of state.cards.keys()) if (!seen.has(id)) state.cards.delete(id);
  $('my-count').textContent = state.cases.length ? `(${state.cases.length})` : '';
  if (items.length === 0) items.push(h('li', { class: 'empty-state', testid: 'no-cases' }, t('worker.empty')));
  const unchanged = items.length === list.children.length && items.every((li, i) => list.children[i] === li);
  if (!unchanged) list.replaceChildren(...items);
  if (focusKey && focusKey[0] && !list.contains(document.activeElement)) {
    list.querySelector(`[data-case-id="${focusKey[0]}"] [data-testid="${focusKey[1]}"]`)?.focus();
  }
}

// -- start ---------------------------------------------------------------------------------------

function paintWho() {
  const me = state.me;
  if (!me) return;
  $('who').textContent = me.worker ? `${me.worker.name} · ${label('level', me.worker.role)}` : label('role', me.role);
}

async function main() {
  applyStatic();
  setupLangToggle($('lang-toggle'));
  onUnauthorized(() => showAuthBanner(t('auth.needed'), t('auth.login'), loginHref()));
  $('logout').addEventListener('click', async () => {
    try { await post('/logout'); } catch { /* already signed out */ }
    location.href = '/login';
  });
  $('refresh').addEventListener('click', refresh);
  onLangChange(() => {
    paintWho();
    state.cards.clear();
    render();
  });
  await loadConfig();
  try {
    state.me = await loadMe();
  } catch {
    return;
  }
  paintWho();
  if (state.me.role !== 'worker') showAuthBanner(t('auth.operator_here'), t('auth.operator_link'), '/');
  await loadCellNames();
  every(REFRESH_MS, refresh);
  setInterval(() => refreshCountdowns(), 1000);
}

main();
