// The local atproto network: one PLC (in memory) and N reference PDSes, listening on one
// address of this machine: loopback, or the gateway of a dev/hostenv network so that hosts
// in their own network namespaces reach them.
//
// Usage: node devnet.mjs CONFIG.json
// CONFIG: {"state_dir", "host", "plc_port", "pds_ports": [..], "accounts": [{"name", "pds"}],
//          "fast_firehose": bool, "owner_pid"}
// Writes STATE_DIR/devnet.json once every server is up and every account exists, then
// runs until SIGTERM/SIGINT, when it stops the servers and exits 0.
//
// Faults, through the control socket STATE_DIR/control.sock (one line in, one line out):
//   stop I [SECONDS]   stop PDS I (its data kept); with SECONDS start it again after that
//   start I            start PDS I again (same port, data, keys and accounts)
//   kill-firehose [I]  close every subscribeRepos connection of PDS I (all PDSes without I)
//   hold-firehose I SECONDS  PDS I's sequencer hands its subscribers nothing new for that
//                      long, then everything held, in order (a stalled sequencer: the
//                      connections stay up and answer pings, the PDS answers reads)
//   status             {"pds": [{"index", "url", "up", "restartAt", "firehoses"}]}
import fs from 'node:fs'
import { createRequire } from 'node:module'
import net from 'node:net'
import path from 'node:path'

// The servers are installed in the cache (cwd), not beside this script.
const require = createRequire(path.join(process.cwd(), 'package.json'))

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'))
const HOST = cfg.host || '127.0.0.1'

// Every server here listens on HOST only: express and the PLC server call listen(port)
// with no host, which would bind all interfaces.
const listen = net.Server.prototype.listen
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'number' && (args.length === 1 || typeof args[1] === 'function')) {
    args.splice(1, 0, HOST)
  }
  return listen.apply(this, args)
}
// The URL others use: "localhost" on loopback (did:web and handles as before), else HOST.
const urlHost = HOST === '127.0.0.1' ? 'localhost' : HOST

const { PDS, envToCfg, envToSecrets } = require('@atproto/pds')
const plc = require('@did-plc/server')
const { Secp256k1Keypair } = require('@atproto/crypto')

const stateDir = cfg.state_dir
const log = (msg) => process.stderr.write(`devnet: ${msg}\n`)

const hex = async () => Buffer.from(await (await Secp256k1Keypair.create({ exportable: true })).export()).toString('hex')

async function startPlc(port) {
  const db = plc.Database.mock()
  const server = plc.PlcServer.create({ db, port })
  await server.start()
  if (HOST !== '127.0.0.1') server.loopback = await loopbackProxy(port)
  return { server, url: `http://${urlHost}:${port}` }
}

// The PDS's own DID resolver refuses URLs whose host is an IP address other than loopback
// ("Invalid hostname"), so the PDSes reach the PLC at http://localhost:PORT: a relay from
// 127.0.0.1:PORT to HOST:PORT (the hosts use HOST:PORT).
async function loopbackProxy(port) {
  const proxy = net.createServer((client) => {
    const upstream = net.connect(port, HOST)
    client.pipe(upstream).pipe(client)
    const close = () => { client.destroy(); upstream.destroy() }
    client.on('error', close)
    upstream.on('error', close)
  })
  await new Promise((resolve, reject) => {
    proxy.once('error', reject)
    listen.call(proxy, port, '127.0.0.1', resolve)
  })
  return proxy
}

// The environment of each PDS, kept so that a stopped PDS starts again as itself.
const pdsEnvs = []

async function startPds(index, port, plcUrl) {
  const dir = path.join(stateDir, `pds${index}`)
  fs.mkdirSync(path.join(dir, 'blobs'), { recursive: true })
  const recovery = await Secp256k1Keypair.create()
  pdsEnvs[index] = {
    devMode: true,
    port,
    hostname: 'localhost',
    serviceDid: `did:web:localhost%3A${port}`,
    dataDirectory: dir,
    blobstoreDiskLocation: path.join(dir, 'blobs'),
    didPlcUrl: plcUrl.replace(`//${urlHost}:`, '//localhost:'),
    recoveryDidKey: recovery.did(),
    plcRotationKeyK256PrivateKeyHex: await hex(),
    adminPassword: 'admin-pass',
    jwtSecret: 'devnet-jwt-secret',
    serviceHandleDomains: [`.pds${index}.test`],
    inviteRequired: false,
    disableSsrfProtection: true,
    // No appview, no crawlers, no email: a PDS alone on loopback.
    bskyAppViewUrl: undefined,
    crawlers: [],
  }
  const server = await runPds(index)
  const env = pdsEnvs[index]
  return { server, url: pdsUrl(port), did: env.serviceDid, handleDomain: `.pds${index}.test` }
}

const pdsUrl = (port) => `http://${urlHost}:${port}`

// Firehose connections per PDS, so that a fault can cut them.
const firehoses = []

async function runPds(index) {
  const env = pdsEnvs[index]
  const config = envToCfg(env)
  const server = await PDS.create(config, envToSecrets(env))
  // The reference PDS calls itself https://HOSTNAME unless the hostname is "localhost", and
  // its OAuth routes (built by create) refuse a plain-http URL that is not loopback. So
  // hostname stays "localhost" (handles, did:web), and once created the PDS writes HOST's
  // URL into the DID documents of the accounts it creates.
  server.ctx.cfg.service.publicUrl = pdsUrl(env.port)
  if (cfg.fast_firehose) capSequencerBackoff(server)
  await server.start()
  firehoses[index] = new Set()
  server.server.on('upgrade', (req, socket) => {
    if (!req.url.includes('com.atproto.sync.subscribeRepos')) return
    firehoses[index].add(socket)
    socket.once('close', () => firehoses[index].delete(socket))
  })
  return server
}

// The sequencer polls its outbox with exponential backoff up to 1 s when idle. Real PDSes
// do that; tests that measure protocol latency may ask for a 20 ms cap instead.
function capSequencerBackoff(server) {
  const seq = server.ctx.sequencer
  if (seq && typeof seq.exponentialBackoff === 'function') {
    const orig = seq.exponentialBackoff.bind(seq)
    seq.exponentialBackoff = (...a) => Math.min(orig(...a), 20)
  } else {
    log('fast_firehose: sequencer has no exponentialBackoff method; left as is')
  }
}

async function xrpc(url, nsid, body, token) {
  const res = await fetch(`${url}/xrpc/${nsid}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) },
    body: JSON.stringify(body),
  })
  const text = await res.text()
  if (!res.ok) throw new Error(`${nsid} at ${url}: HTTP ${res.status} ${text}`)
  return JSON.parse(text)
}

async function createAccount(name, pds) {
  const handle = `${name}${pds.handleDomain}`
  const password = `${name}-password`
  const acct = await xrpc(pds.url, 'com.atproto.server.createAccount', { handle, email: `${name}@devnet.test`, password })
  const app = await xrpc(pds.url, 'com.atproto.server.createAppPassword', { name: 'meshlet' }, acct.accessJwt)
  return { name, did: acct.did, handle, password, app_password: app.password, pds_url: pds.url }
}

const servers = []
const pdsServers = []
const restartTimers = []
let stopping = false

async function stopPds(i, seconds) {
  if (!pdsServers[i]) throw new Error(`PDS ${i} is not running`)
  const server = pdsServers[i]
  pdsServers[i] = null
  servers.splice(servers.indexOf(server), 1)
  killFirehose(i)
  await server.destroy()
  log(`PDS ${i} stopped${seconds ? ` for ${seconds} s` : ''}`)
  if (seconds) {
    restartTimers[i] = { at: Date.now() + seconds * 1000 }
    restartTimers[i].timer = setTimeout(() => startPdsAgain(i).catch((e) => log(`restart of PDS ${i}: ${e}`)), seconds * 1000)
  }
}

async function startPdsAgain(i) {
  if (restartTimers[i]) { clearTimeout(restartTimers[i].timer); restartTimers[i] = null }
  if (pdsServers[i]) return
  const server = await runPds(i)
  pdsServers[i] = server
  servers.push(server)
  log(`PDS ${i} started again`)
}

// The PDSes whose sequencer `hold-firehose` holds back now.
const held = new Set()

function holdFirehose(i, seconds) {
  const server = pdsServers[i]
  if (!server) throw new Error(`PDS ${i} is not running`)
  if (!(seconds > 0)) throw new Error(`hold-firehose needs SECONDS > 0, got '${seconds}'`)
  const seq = server.ctx.sequencer
  if (held.has(i)) throw new Error(`the firehose of PDS ${i} is held already`)
  const queue = []
  held.add(i)
  const emit = seq.emit
  seq.emit = function (name, ...args) {
    if (name === 'events') { queue.push(args); return true }
    return emit.call(this, name, ...args)
  }
  setTimeout(() => {
    seq.emit = emit
    held.delete(i)
    for (const args of queue) emit.call(seq, 'events', ...args)
    log(`firehose of PDS ${i} released: ${queue.length} batch(es) held ${seconds} s`)
  }, seconds * 1000)
  log(`firehose of PDS ${i} held for ${seconds} s`)
}

function killFirehose(i) {
  let n = 0
  for (const [j, set] of firehoses.entries()) {
    if (i !== undefined && i !== j) continue
    for (const socket of set || []) { socket.destroy(); n++ }
  }
  log(`killed ${n} firehose connection(s)`)
  return n
}

async function control(line) {
  const [cmd, a, b] = line.trim().split(/\s+/)
  const index = (x) => {
    const i = Number(x)
    if (!Number.isInteger(i) || i < 0 || i >= pdsEnvs.length) throw new Error(`no PDS ${x}`)
    return i
  }
  if (cmd === 'stop') { await stopPds(index(a), b ? Number(b) : 0); return 'ok' }
  if (cmd === 'start') { await startPdsAgain(index(a)); return 'ok' }
  if (cmd === 'kill-firehose') return `ok ${killFirehose(a === undefined ? undefined : index(a))}`
  if (cmd === 'hold-firehose') { holdFirehose(index(a), Number(b)); return 'ok' }
  if (cmd === 'status') {
    return JSON.stringify({
      pds: pdsEnvs.map((env, i) => ({
        index: i, url: pdsUrl(env.port), up: !!pdsServers[i],
        restartAt: restartTimers[i] ? new Date(restartTimers[i].at).toISOString() : null,
        firehoses: firehoses[i] ? firehoses[i].size : 0,
      })),
    })
  }
  throw new Error(`unknown command '${cmd}'`)
}

function serveControl() {
  const sock = path.join(stateDir, 'control.sock')
  fs.rmSync(sock, { force: true })
  const server = net.createServer((conn) => {
    let buf = ''
    conn.on('data', (d) => {
      buf += d
      if (!buf.includes('\n')) return
      control(buf.split('\n')[0]).then(
        (out) => conn.end(`${out}\n`),
        (e) => conn.end(`error ${e.message}\n`),
      )
    })
  })
  server.listen(sock)
  server.unref()
}
async function stop(code) {
  if (stopping) return
  stopping = true
  for (const s of servers.reverse()) {
    try { await s.destroy() } catch (e) { log(`stop: ${e}`) }
    if (s.loopback) s.loopback.close()
  }
  process.exit(code)
}
process.on('SIGTERM', () => stop(0))
process.on('SIGINT', () => stop(0))

try {
  const t0 = Date.now()
  const p = await startPlc(cfg.plc_port)
  servers.push(p.server)
  const pdses = []
  for (const [i, port] of cfg.pds_ports.entries()) {
    const s = await startPds(i, port, p.url)
    servers.push(s.server)
    pdsServers[i] = s.server
    pdses.push(s)
  }
  const accounts = {}
  for (const a of cfg.accounts) accounts[a.name] = await createAccount(a.name, pdses[a.pds])
  serveControl()
  const desc = {
    pid: process.pid,
    host: HOST,
    plc_url: p.url,
    pds: pdses.map((s) => ({ url: s.url, did: s.did, handle_domain: s.handleDomain })),
    accounts,
    fast_firehose: !!cfg.fast_firehose,
  }
  const tmp = path.join(stateDir, 'devnet.json.tmp')
  fs.writeFileSync(tmp, JSON.stringify(desc, null, 2))
  fs.renameSync(tmp, path.join(stateDir, 'devnet.json'))
  log(`ready in ${Date.now() - t0} ms: PLC ${p.url}, ${pdses.length} PDS, ${cfg.accounts.length} accounts`)
  // Started for a test run: go when that process is gone (even SIGKILLed), leaving nothing.
  if (cfg.owner_pid) {
    setInterval(() => {
      try {
        process.kill(cfg.owner_pid, 0)
      } catch {
        log(`owner ${cfg.owner_pid} is gone: stopping and removing ${stateDir}`)
        fs.rmSync(stateDir, { recursive: true, force: true })
        stop(0)
      }
    }, 1000).unref()
  }
} catch (e) {
  log(`start failed: ${e.stack || e}`)
  await stop(1)
}
