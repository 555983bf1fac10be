// The local atproto network: one PLC (in memory) and N reference PDSes on loopback.
//
// Usage: node devnet.mjs CONFIG.json
// CONFIG: {"state_dir", "plc_port", "pds_ports": [..], "accounts": [{"name", "pds"}],
//          "fast_firehose": bool}
// Writes STATE_DIR/devnet.json once every server is up and every account exists, then
// runs until SIGTERM/SIGINT, when it stops the servers and exits 0.
//
// A PDS can be stopped and started again with its data (an outage, for tests):
// POST <control_url>/pds/<i>/stop and POST <control_url>/pds/<i>/start (devnet.json names
// control_url; loopback only).
import fs from 'node:fs'
import http from 'node:http'
import { createRequire } from 'node:module'
import net from 'node:net'
import path from 'node:path'

// The servers are installed in the cache (cwd), not beside this script.
const require = createRequire(path.join(process.cwd(), 'package.json'))

// Every server here listens on loopback only: express and the PLC server call
// listen(port) with no host, which would bind all interfaces.
const listen = net.Server.prototype.listen
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'number' && (args.length === 1 || typeof args[1] === 'function')) {
    args.splice(1, 0, '127.0.0.1')
  }
  return listen.apply(this, args)
}

const { PDS, envToCfg, envToSecrets } = require('@atproto/pds')
const plc = require('@did-plc/server')
const { Secp256k1Keypair } = require('@atproto/crypto')

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'))
const stateDir = cfg.state_dir
const log = (msg) => process.stderr.write(`devnet: ${msg}\n`)

const hex = async () => Buffer.from(await (await Secp256k1Keypair.create({ exportable: true })).export()).toString('hex')

async function startPlc(port) {
  const db = plc.Database.mock()
  const server = plc.PlcServer.create({ db, port })
  await server.start()
  return { server, url: `http://localhost:${port}` }
}

async function startPds(index, port, plcUrl) {
  const dir = path.join(stateDir, `pds${index}`)
  fs.mkdirSync(path.join(dir, 'blobs'), { recursive: true })
  const recovery = await Secp256k1Keypair.create()
  const env = {
    devMode: true,
    port,
    hostname: 'localhost',
    serviceDid: `did:web:localhost%3A${port}`,
    dataDirectory: dir,
    blobstoreDiskLocation: path.join(dir, 'blobs'),
    didPlcUrl: plcUrl,
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
  const server = await createPds(env)
  return { server, env, url: `http://localhost:${port}`, did: env.serviceDid, handleDomain: `.pds${index}.test` }
}

async function createPds(env) {
  const server = await PDS.create(envToCfg(env), envToSecrets(env))
  if (cfg.fast_firehose) capSequencerBackoff(server)
  await server.start()
  return server
}

// Outages: stop one PDS (its port closes; its data directory stays) and start it again on
// the same port, keys and data.
async function stopPds(pds) {
  if (!pds.server) return 'stopped already'
  const server = pds.server
  pds.server = null
  const i = servers.indexOf(server)
  if (i >= 0) servers.splice(i, 1)
  await server.destroy()
  return 'stopped'
}

async function resumePds(pds) {
  if (pds.server) return 'running already'
  pds.server = await createPds(pds.env)
  servers.push(pds.server)
  return 'started'
}

function serveControl(pdses, port) {
  const server = http.createServer(async (req, res) => {
    const m = /^\/pds\/(\d+)\/(stop|start)$/.exec(req.url || '')
    const pds = m && pdses[Number(m[1])]
    if (req.method !== 'POST' || !pds) {
      res.writeHead(404).end('POST /pds/<i>/stop or /pds/<i>/start\n')
      return
    }
    try {
      const what = await (m[2] === 'stop' ? stopPds(pds) : resumePds(pds))
      log(`pds${m[1]} (${pds.url}): ${what}`)
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ pds: Number(m[1]), state: what }))
    } catch (e) {
      log(`pds${m[1]} ${m[2]} failed: ${e.stack || e}`)
      res.writeHead(500).end(String(e))
    }
  })
  return new Promise((resolve) => server.listen(port, '127.0.0.1', () => resolve(server)))
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
let stopping = false
async function stop(code) {
  if (stopping) return
  stopping = true
  for (const s of servers.reverse()) {
    try { await s.destroy() } catch (e) { log(`stop: ${e}`) }
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
    pdses.push(s)
  }
  const accounts = {}
  for (const a of cfg.accounts) accounts[a.name] = await createAccount(a.name, pdses[a.pds])
  const control = await serveControl(pdses, cfg.control_port || 0)
  servers.push({ destroy: () => new Promise((resolve) => control.close(() => resolve())) })
  const desc = {
    pid: process.pid,
    plc_url: p.url,
    control_url: `http://127.0.0.1:${control.address().port}`,
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
