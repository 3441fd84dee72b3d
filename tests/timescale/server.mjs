// PGlite (PostgreSQL 17 in WebAssembly) with the TimescaleDB extension, served
// over the PostgreSQL wire protocol by pglite-socket, for tests/timescale.
//
//   node server.mjs [PORT] [DATA_DIR]
//
// PORT defaults to $PGLITE_PORT, then 0 (the OS picks a free port). DATA_DIR
// defaults to $PGLITE_DATA, then an in-memory database. Once listening it prints
// one line to stdout and the caller reads the port from it:
//
//   READY host=127.0.0.1 port=NNNNN
//
// No TLS (an SSLRequest is declined, so sslmode=prefer works too), any password
// is accepted (use postgres/postgres), and ONE client connection is served at a
// time: a second one waits in pglite-socket's queue until the first disconnects.
// SIGTERM / SIGINT stop the server and close the database; so does the end of
// stdin when PGLITE_EXIT_ON_STDIN_EOF=1 (the test fixture sets it, so a killed
// pytest leaves no server behind). PGLITE_DEBUG=1 logs traffic sizes to stderr.
//
// pglite-socket 0.0.19 hands every TCP chunk straight to PGlite. Four things a
// real PostgreSQL client needs do not work that way, so this file replaces the
// handler's input path (`PGLiteSocketHandler.prototype.handleData`, a private
// method of the pinned 0.0.19; checked at start-up) and hooks `detach`:
//
// 1. Terminate ('X') is passed to PGlite, which answers nothing, and the socket
//    stays open, so a client that sends Terminate and waits for the server to
//    close (asyncpg's Connection.close()) hangs for ever. Here Terminate closes
//    the connection, as the protocol says.
// 2. COPY ... FROM STDIN: PGlite aborts the whole WebAssembly instance
//    ("RuntimeError: unreachable") when the COPY query arrives without its data,
//    because it cannot wait for CopyData from a later call. It works when the
//    query, the CopyData messages and CopyDone/CopyFail come in ONE
//    execProtocolRaw call. So: answer the client with a CopyInResponse at once,
//    buffer the copy messages until CopyDone/CopyFail, send everything in one
//    call and drop PGlite's own CopyInResponse from the answer. Only simple-query
//    COPY (what asyncpg, psycopg and psql send) is recognised, and the whole copy
//    payload is held in memory.
// 3. PGlite is one backend session shared by every connection, so prepared
//    statements, advisory locks, SET values and an open transaction would leak
//    from one client into the next. When a client goes away the session is reset
//    (ROLLBACK + DISCARD ALL) before the next client is let in.
// 4. An SSLRequest gets an answer that is neither 'S' nor 'N' from PGlite, so
//    clients in sslmode=prefer (asyncpg's default) fail with "rejected SSL
//    upgrade". Here SSLRequest and GSSENCRequest are answered 'N' (no TLS).
//
// Messages are also framed here: PGlite only ever gets whole protocol messages,
// never a message cut in two by TCP.

import { PGlite } from '@electric-sql/pglite'
import { timescaledb } from '@electric-sql/pglite/timescaledb'
import { PGLiteSocketHandler, PGLiteSocketServer } from '@electric-sql/pglite-socket'

const HOST = '127.0.0.1'
const port = Number.parseInt(process.argv[2] ?? process.env.PGLITE_PORT ?? '0', 10)
const dataDir = process.argv[3] ?? process.env.PGLITE_DATA ?? 'memory://'
const debug = process.env.PGLITE_DEBUG === '1'

if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`server.mjs: bad port ${JSON.stringify(process.argv[2])}`)
  process.exit(2)
}

// ---------------------------------------------------------------- protocol bits

const ENCRYPTION_REQUESTS = new Set([80877103, 80877104]) // SSLRequest, GSSENCRequest
const COPY_FROM_STDIN = /^\s*COPY\b[\s\S]*\bFROM\s+STDIN\b/i
const BINARY_OPTION = /\bFROM\s+STDIN\b[\s\S]*\bBINARY\b/i

function message(type, body = Buffer.alloc(0)) {
  const out = Buffer.alloc(5 + body.length)
  out.write(type, 0, 'latin1')
  out.writeInt32BE(4 + body.length, 1)
  body.copy(out, 5)
  return out
}

const query = (sql) => message('Q', Buffer.from(`${sql}\0`, 'utf8'))

// CopyInResponse with no per-column formats: overall format 0 (text) or 1 (binary).
const copyInResponse = (binary) => message('G', Buffer.from([binary ? 1 : 0, 0, 0]))

// Remove the first CopyInResponse ('G') from a backend answer.
function dropCopyInResponse(answer) {
  let at = 0
  while (at + 5 <= answer.length) {
    const length = answer.readInt32BE(at + 1)
    if (answer[at] === 0x47) {
      return Buffer.concat([answer.subarray(0, at), answer.subarray(at + 1 + length)])
    }
    at += 1 + length
  }
  return answer
}

// Splits a byte stream into whole messages. The first messages of a connection
// (StartupMessage, SSLRequest, GSSENCRequest) have no type byte.
class Framer {
  constructor() {
    this.pending = Buffer.alloc(0)
    this.startup = true
  }

  push(chunk) {
    this.pending = this.pending.length ? Buffer.concat([this.pending, chunk]) : chunk
    const messages = []
    for (;;) {
      const header = this.startup ? 4 : 5
      if (this.pending.length < header) break
      const length = this.pending.readInt32BE(header - 4)
      const total = header - 4 + length
      if (this.pending.length < total) break
      const bytes = this.pending.subarray(0, total)
      this.pending = this.pending.subarray(total)
      if (this.startup) {
        // SSLRequest / GSSENCRequest are 8 bytes; the StartupMessage is longer.
        if (length > 8) this.startup = false
        messages.push({ type: null, bytes })
      } else {
        messages.push({ type: String.fromCharCode(bytes[0]), bytes })
      }
    }
    return messages
  }
}

// A WebAssembly trap leaves the PGlite instance unusable: exit, so the test sees
// the server die instead of a hang.
function fatal(err) {
  console.error('server.mjs: PGlite crashed, exiting:', err)
  process.exit(70)
}

// pglite-socket rejects its PGlite lock on a socket error and nobody handles that
// promise; under Node's default that would kill the server on any client reset.
process.on('unhandledRejection', (reason) => {
  if (reason instanceof WebAssembly.RuntimeError) fatal(reason)
  console.error('server.mjs: unhandled rejection:', reason)
})

// ------------------------------------------------------ pglite-socket patching

const proto = PGLiteSocketHandler.prototype
for (const name of ['handleData', 'detach']) {
  if (typeof proto[name] !== 'function') {
    console.error(
      `server.mjs: @electric-sql/pglite-socket has no PGLiteSocketHandler.${name}; ` +
        'this file patches the internals of 0.0.19, check package-lock.json',
    )
    process.exit(3)
  }
}

function state(handler) {
  if (!handler.gw) {
    handler.gw = { framer: new Framer(), batch: [], copy: null, chain: Promise.resolve() }
  }
  return handler.gw
}

async function run(handler, parts, { stripCopyIn = false } = {}) {
  if (parts.length === 0) return
  let answer = Buffer.from(await handler.db.execProtocolRaw(new Uint8Array(Buffer.concat(parts))))
  if (stripCopyIn) answer = dropCopyInResponse(answer)
  if (debug) console.error(`server.mjs: ${parts.length} message(s) -> ${answer.length} bytes`)
  if (answer.length > 0 && handler.socket?.writable) {
    await new Promise((resolve, reject) => {
      handler.socket.write(answer, (err) => (err ? reject(err) : resolve()))
    })
  }
}

async function handleMessages(handler, messages) {
  const gw = state(handler)
  for (const { type, bytes } of messages) {
    if (!handler.socket) return
    if (gw.copy) {
      gw.copy.push(bytes)
      if (type === 'c' || type === 'f') {
        const parts = gw.copy
        gw.copy = null
        await run(handler, parts, { stripCopyIn: true })
      }
    } else if (type === null && bytes.length === 8 && ENCRYPTION_REQUESTS.has(bytes.readInt32BE(4))) {
      handler.socket.write('N')
    } else if (type === 'X') {
      await run(handler, gw.batch.splice(0))
      handler.detach(true)
      return
    } else if (type === 'Q' && COPY_FROM_STDIN.test(bytes.subarray(5, -1).toString('utf8'))) {
      await run(handler, gw.batch.splice(0))
      const sql = bytes.subarray(5, -1).toString('utf8')
      gw.copy = [bytes]
      handler.socket.write(copyInResponse(BINARY_OPTION.test(sql)))
    } else {
      gw.batch.push(bytes)
    }
  }
  await run(handler, gw.batch.splice(0))
}

proto.handleData = function handleData(data) {
  if (!this.socket || !this.active) return Promise.resolve(0)
  const gw = state(this)
  const messages = gw.framer.push(Buffer.from(data))
  gw.chain = gw.chain
    .then(() => handleMessages(this, messages))
    .catch((err) => {
      if (err instanceof WebAssembly.RuntimeError) fatal(err)
      console.error('server.mjs: closing the connection after an error:', err)
      this.detach(true)
    })
  return gw.chain.then(() => data.length)
}

const originalDetach = proto.detach
proto.detach = function detach(close) {
  if (this.socket) {
    // Still holding PGlite's exclusive lock: reset the shared session before the
    // next client gets it. Sync ends a half-done extended-protocol exchange.
    this.gw = undefined
    try {
      for (const bytes of resetSession) {
        this.db.execProtocolRawSync(new Uint8Array(bytes))
      }
    } catch (err) {
      console.error('server.mjs: session reset failed:', err)
    }
  }
  return originalDetach.call(this, close)
}

// ----------------------------------------------------------------------- main

const db = await PGlite.create(dataDir, { extensions: { timescaledb } })

// DISCARD ALL runs RESET ALL, which would also undo what PGlite itself SETs for
// its session (search_path = public; RESET gives pg_catalog, and tables created
// by the previous client would vanish from view). Put those back afterwards.
const sessionSettings = (
  await db.query("SELECT name, setting FROM pg_settings WHERE source = 'session'")
).rows
const literal = (text) => `'${text.replaceAll("'", "''")}'`
const resetSession = [message('S'), query('ROLLBACK'), query('DISCARD ALL')]
for (const { name, setting } of sessionSettings) {
  resetSession.push(query(`SELECT set_config(${literal(name)}, ${literal(setting)}, false)`))
}
const server = new PGLiteSocketServer({ db, host: HOST, port, debug })
server.addEventListener('error', (event) => {
  console.error('server.mjs: pglite-socket error:', event.detail)
})
await server.start()

let stopping = false
async function shutdown(signal) {
  if (stopping) return
  stopping = true
  if (debug) console.error(`server.mjs: ${signal}, stopping`)
  try {
    await server.stop()
    await db.close()
  } finally {
    process.exit(0)
  }
}
process.on('SIGTERM', () => shutdown('SIGTERM'))
process.on('SIGINT', () => shutdown('SIGINT'))
if (process.env.PGLITE_EXIT_ON_STDIN_EOF === '1') {
  // The test fixture holds our stdin open: if it dies, even by SIGKILL, we go too.
  process.stdin.on('end', () => shutdown('stdin closed'))
  process.stdin.resume()
}

const actualPort = server.getServerConn().split(':').pop()
console.log(`READY host=${HOST} port=${actualPort}`)
