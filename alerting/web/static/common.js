// Shared by both pages: the API client, DOM helpers, times in the city's zone, badges.
import { t, label, locale, getLang } from './i18n.js';

// -- the API -----------------------------------------------------------------------------

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

let unauthorized = () => {};

/** What to do when the session is missing or expired (401). */
export function onUnauthorized(fn) {
  unauthorized = fn;
}

/** JSON from the API (same-origin, session cookie). POSTs carry X-Requested-With. */
export async function api(path, { method = 'GET', body } = {}) {
  const headers = { Accept: 'application/json' };
  if (method !== 'GET') headers['X-Requested-With'] = 'gridwarden';
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      credentials: 'same-origin',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, err.message || 'network error');
  }
  let data = null;
  const text = await response.text();
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    if (response.status === 401) unauthorized();
    const detail = data && (data.error ?? data.detail);
    const message = typeof detail === 'string' ? detail : `HTTP ${response.status}`;
    const problems = data && Array.isArray(data.problems) ? `: ${data.problems.join('; ')}` : '';
    throw new ApiError(response.status, message + problems);
  }
  return data;
}

export const post = (path, body) => api(path, { method: 'POST', body: body ?? {} });

export function qs(params) {
  const out = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== '') out.set(k, v);
  }
  const s = out.toString();
  return s ? `?${s}` : '';
}

/** /api/me, normalised: {role, worker: {id, name, role} | null}. */
export async function loadMe() {
  const me = await api('/api/me');
  const worker = me.worker ?? (me.worker_id ? {
    id: me.worker_id, name: me.worker_name ?? me.name ?? me.worker_id, role: me.worker_role,
  } : null);
  return { role: me.role, worker };
}

// -- configuration and time ----------------------------------------------------------------

let timeZone = 'Asia/Shanghai';

/** /api/config: the city's time zone (every time is shown in it; the API stays UTC). */
export async function loadConfig() {
  try {
    const config = await api('/api/config');
    if (config && config.timezone) {
      new Intl.DateTimeFormat('en', { timeZone: config.timezone }); // throws when unknown
      timeZone = config.timezone;
    }
    return config || {};
  } catch (err) {
    console.warn('config unavailable, using', timeZone, err);
    return {};
  }
}

export const getTimeZone = () => timeZone;

const formatters = new Map();
function formatter(kind) {
  const key = `${locale()}|${timeZone}|${kind}`;
  if (!formatters.has(key)) {
    const opts = { timeZone, hourCycle: 'h23' };
    if (kind !== 'time') Object.assign(opts, { year: 'numeric', month: '2-digit', day: '2-digit' });
    if (kind !== 'date') Object.assign(opts, { hour: '2-digit', minute: '2-digit', second: '2-digit' });
    if (kind === 'short') delete opts.second;
    formatters.set(key, new Intl.DateTimeFormat(locale(), opts));
  }
  return formatters.get(key);
}

const dayOf = (date) => formatter('date').format(date);

/** An API time (RFC 3339 UTC) in the city's zone: the time alone when it is today. */
export function fmtTime(iso, { full = false, seconds = true } = {}) {
  if (!iso) return '—';
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  if (!full && dayOf(date) === dayOf(new Date())) return formatter('time').format(date);
  return formatter(seconds ? 'full' : 'short').format(date);
}

/** A <time> element with the machine-readable UTC value and the full time as its title. */
export function timeEl(iso, opts) {
  const el = h('time', { datetime: iso ?? '' }, fmtTime(iso, opts));
  if (iso) el.title = `${fmtTime(iso, { full: true })} (${timeZone})`;
  return el;
}

/** 75 → "1:15", 4000 → "1:06:40", 90000 → "1d 1:00:00" (a countdown). */
export function fmtClock(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const d = Math.floor(s / 86400);
  const hh = Math.floor((s % 86400) / 3600);
  const mm = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, '0');
  const body = hh || d ? `${hh}:${String(mm).padStart(2, '0')}:${ss}` : `${mm}:${ss}`;
  return d ? `${d}${getLang() === 'zh' ? '天' : 'd'} ${body}` : body;
}

/** A duration in words for the statistics: 42 s, 3.5 min, 2.1 h. */
export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return '—';
  const zh = getLang() === 'zh';
  if (seconds < 90) return `${Math.round(seconds)}${zh ? ' 秒' : ' s'}`;
  if (seconds < 5400) return `${(seconds / 60).toFixed(1)}${zh ? ' 分钟' : ' min'}`;
  return `${(seconds / 3600).toFixed(1)}${zh ? ' 小时' : ' h'}`;
}

export const fmtPercent = (v) => (v === null || v === undefined ? '—' : `${Math.round(v * 100)}%`);

export function fmtNumber(v, digits = 1) {
  if (v === null || v === undefined || Number.isNaN(v)) return '—';
  return Number.isInteger(v) ? String(v) : v.toFixed(digits);
}

/** The case's next deadline as text: {text, overdue} ('—' without one). */
export function dueText(caseJson, now = Date.now()) {
  if (!caseJson.due_at) return { text: t('due.none'), overdue: false };
  const left = (new Date(caseJson.due_at).getTime() - now) / 1000;
  const step = caseJson.due_step ? label('due', caseJson.due_step) : '';
  if (left >= 0) return { text: t('due.left', { step, time: fmtClock(left) }), overdue: false };
  return { text: t('due.over', { step, time: fmtClock(-left) }), overdue: true };
}

/** A live countdown element; refreshCountdowns() updates every one on the page. */
export function countdownEl(caseJson) {
  const el = h('span', { class: 'countdown', 'data-due': caseJson.due_at ?? '', 'data-step': caseJson.due_step ?? '' });
  paintCountdown(el);
  return el;
}

function paintCountdown(el) {
  const { text, overdue } = dueText({ due_at: el.dataset.due || null, due_step: el.dataset.step || null });
  el.textContent = overdue ? `⚠ ${text}` : text;
  el.classList.toggle('overdue', overdue);
}

export function refreshCountdowns(root = document) {
  for (const el of root.querySelectorAll('.countdown')) paintCountdown(el);
}

// -- the DOM -------------------------------------------------------------------------------

function build(el, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2), value);
    } else if (key === 'dataset') {
      Object.assign(el.dataset, value);
    } else if (key === 'testid') {
      el.setAttribute('data-testid', value);
    } else {
      el.setAttribute(key, value === true ? '' : String(value));
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** h('button', {class: 'x', onclick: fn, testid: 'action-ack'}, 'text', child…) */
export const h = (tag, attrs, ...children) => build(document.createElement(tag), attrs, children);

const SVG_NS = 'http://www.w3.org/2000/svg';
export const s = (tag, attrs, ...children) => build(document.createElementNS(SVG_NS, tag), attrs, children);

export function replace(el, ...children) {
  el.replaceChildren();
  return build(el, {}, children);
}

export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

/** Run fn now and every `ms` (skipped while the tab is hidden; run again on return). */
export function every(ms, fn) {
  const tick = () => {
    if (!document.hidden) fn();
  };
  document.addEventListener('visibilitychange', tick);
  tick();
  return setInterval(tick, ms);
}

// -- badges (text as well as colour) --------------------------------------------------------

export const SEVERITIES = ['critical', 'major', 'minor', 'warning'];
const SEVERITY_MARK = { critical: '▲', major: '◆', minor: '●', warning: '○' };

export function severityBadge(severity) {
  return h('span', { class: `badge sev sev-${severity}` },
    h('span', { 'aria-hidden': 'true' }, SEVERITY_MARK[severity] ?? '•'), ' ', label('severity', severity));
}

export const alarmStateBadge = (state) =>
  h('span', { class: `badge astate astate-${state}` }, label('alarm_state', state));

export const caseStateBadge = (state) =>
  h('span', { class: `badge cstate cstate-${state}` }, label('state', state));

export const ruleLabel = (rule) => label('rule', rule);

/** geo: URI for phones (opens the map app); works offline with an installed map. */
export const geoUri = (lat, lon) => `geo:${lat},${lon}?q=${lat},${lon}`;

export const fmtLatLon = (lat, lon) =>
  lat === null || lat === undefined ? '—' : `${Number(lat).toFixed(5)}, ${Number(lon).toFixed(5)}`;

// -- status messages -----------------------------------------------------------------------

/** A short message in the page's polite live region (#status). */
export function say(message, kind = 'info') {
  const region = document.getElementById('status');
  if (!region) return;
  const item = h('p', { class: `toast toast-${kind}` }, message);
  region.append(item);
  setTimeout(() => item.remove(), kind === 'error' ? 8000 : 4000);
}

export function errorText(err) {
  return t('common.error', { msg: err && err.message ? err.message : String(err) });
}

/** Show the sign-in notice (#auth-banner) instead of failing silently. */
export function showAuthBanner(message, linkText, href) {
  const banner = document.getElementById('auth-banner');
  if (!banner) return;
  replace(banner, h('p', {}, message, ' ', h('a', { href }, linkText)));
  banner.hidden = false;
}

export function loginHref() {
  return `/login?next=${encodeURIComponent(location.pathname + location.hash)}`;
}
