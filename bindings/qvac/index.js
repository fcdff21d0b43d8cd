'use strict'
// @ggml-coreml/qvac: turns ggml-coreml on for QVAC's llama.cpp addons (@qvac/llm-llamacpp,
// @qvac/embed-llamacpp) under Bare, picks the ANE policy for the device, switches it at run time
// and reports what the backend did.
//
// Bare has no FFI, so everything goes through the backend's environment and file controls:
// GGML_BACKEND_PATH (read by QVAC's fabric when it loads its backends, once per process),
// GGML_COREML_POLICY (read once, when the backend initialises: decides which weights it takes),
// GGML_COREML_CONTROL (a file with `policy=<mode>`, re-read by the backend when it changes) and
// GGML_COREML_STATS_FILE (JSON the backend rewrites while it computes and when it is freed).

const fs = require('bare-fs')
const os = require('bare-os')
const path = require('bare-path')

const POLICIES = Object.freeze(['latency', 'energy', 'off', 'always'])

const ENV = Object.freeze({
  backendPath: 'GGML_BACKEND_PATH',
  policy: 'GGML_COREML_POLICY',
  control: 'GGML_COREML_CONTROL',
  stats: 'GGML_COREML_STATS_FILE',
  log: 'GGML_COREML_LOG',
  library: 'GGML_COREML_LIBRARY'
})

function getEnv (name) {
  const v = os.hasEnv(name) ? os.getEnv(name) : undefined
  return v === undefined || v === '' ? undefined : v
}

function checkPolicy (policy) {
  if (!POLICIES.includes(policy)) {
    throw new TypeError(`unknown ANE policy ${JSON.stringify(policy)} (expected one of ${POLICIES.join(', ')})`)
  }
  return policy
}

function libraryFileName (platform = os.platform()) {
  if (platform === 'darwin' || platform === 'ios') return 'libggml-coreml.dylib'
  if (platform === 'win32') return 'ggml-coreml.dll'
  return 'libggml-coreml.so'
}

// Where the backend library may be: the option, else the environment (either one is the only
// candidate: an explicit path that is missing is an error, not a reason to load another build),
// else the package's own prebuilds and the cargo target dirs of a ggml-coreml checkout.
function libraryCandidates (opts = {}) {
  if (opts.library) return [path.resolve(opts.library)]
  const fromEnv = getEnv(ENV.library)
  if (fromEnv) return [path.resolve(fromEnv)]
  const file = libraryFileName(opts.platform)
  const host = `${opts.platform || os.platform()}-${opts.arch || os.arch()}`
  const out = []
  out.push(path.join(__dirname, 'prebuilds', host, file))
  const targetDir = getEnv('CARGO_TARGET_DIR')
  if (targetDir) out.push(path.join(path.resolve(targetDir), 'release', file))
  out.push(path.join(__dirname, '..', '..', 'target', 'release', file))
  return out
}

function isFile (p) {
  try {
    return fs.statSync(p).isFile()
  } catch {
    return false
  }
}

/** Absolute path of the backend library, or null when none of the candidates exists. */
function locateLibrary (opts = {}) {
  for (const p of libraryCandidates(opts)) {
    if (isFile(p)) return p
  }
  return null
}

/** The Apple silicon generation in a CPU model string ("Apple M4 Pro" -> 4), or null. */
function appleChipGeneration (cpuModel) {
  const m = /\bApple M(\d+)\b/.exec(String(cpuModel || ''))
  return m ? Number(m[1]) : null
}

/** What the per-device default looks at: platform, architecture, CPU model string. */
function detectDevice () {
  let cpuModel = ''
  try {
    const cpus = os.cpus()
    if (cpus && cpus.length > 0) cpuModel = cpus[0].model || ''
  } catch {}
  return { platform: os.platform(), arch: os.arch(), cpuModel }
}

/**
 * The per-device default policy: iPhone/iPad -> energy (the ANE's strength is joules per token),
 * Mac with M4 or later -> latency (the ANE wins prefill there), older Macs -> off, Linux -> latency
 * (the backend itself declines there: its reference executor is never profitable), others -> off.
 */
function defaultPolicy (device = detectDevice()) {
  const { platform, arch, cpuModel } = device
  if (platform === 'ios') return { policy: 'energy', reason: 'iPhone/iPad: energy' }
  if (platform === 'darwin') {
    const gen = appleChipGeneration(cpuModel)
    if (arch === 'arm64' && gen !== null && gen >= 4) {
      return { policy: 'latency', reason: `Mac with Apple M${gen}: latency` }
    }
    return { policy: 'off', reason: `Mac with ${cpuModel || arch} (before M4): off` }
  }
  if (platform === 'linux') {
    return { policy: 'latency', reason: 'Linux: latency (the backend declines without an ANE)' }
  }
  return { policy: 'off', reason: `${platform}: no Neural Engine` }
}

function writeAtomic (file, text) {
  // Write-then-rename: the backend never reads a half-written file, and the mtime always changes.
  const tmp = `${file}.${os.pid()}.tmp`
  fs.writeFileSync(tmp, text)
  fs.renameSync(tmp, file)
}

function readJson (file) {
  let text
  try {
    text = fs.readFileSync(file, 'utf8')
  } catch {
    return null
  }
  try {
    return JSON.parse(text)
  } catch {
    return null
  }
}

function mtimeMs (file) {
  try {
    return fs.statSync(file).mtimeMs
  } catch {
    return null
  }
}

// One backend per process: fabric keeps one ggml backend registry for every addon.
let current = null

class CoreMLBackend {
  constructor ({ library, policy, policyReason, controlFile, statsFile, stateDir }) {
    this.library = library
    this.controlFile = controlFile
    this.statsFile = statsFile
    this.stateDir = stateDir
    this.policyReason = policyReason
    this._policy = policy
  }

  /** The policy last set through this object (the backend applies it at its next graph). */
  get policy () {
    return this._policy
  }

  /**
   * Switches the policy at run time. The backend re-reads the control file at its next graph
   * computation (checked at most every 250 ms). Which weights the backend holds was decided at
   * model load under the policy then in force: switching to 'off' sends every later matmul to the
   * host; switching on again only reaches weights it took at load.
   */
  setPolicy (policy) {
    checkPolicy(policy)
    writeAtomic(this.controlFile, `policy=${policy}\n`)
    // A backend not initialised yet reads the environment instead.
    os.setEnv(ENV.policy, policy)
    this._policy = policy
    this.policyReason = 'set at run time'
    return this
  }

  /**
   * The backend's statistics as it last wrote them, or null before its first graph (or when the
   * library predates the stats file). Fields: policy, executor, ane_ops, host_ops, host_reasons
   * ({reason: count}), faults, ane_ms, host_ms, weights_prepared, …; plus `ageMs`, how old the
   * snapshot is. The backend rewrites the file at most every 500 ms while it computes and always
   * when a context is freed (model.unload()), so a snapshot taken right after a run may lag.
   */
  stats () {
    const s = readJson(this.statsFile)
    if (!s || typeof s !== 'object') return null
    const m = mtimeMs(this.statsFile)
    s.ageMs = m === null ? null : Math.max(0, Date.now() - m)
    return s
  }

  /** Counters that grew between two snapshots (`before` may be null). */
  delta (before, after = this.stats()) {
    if (!after) return null
    const b = before || {}
    const num = (k) => (after[k] || 0) - (b[k] || 0)
    const reasons = {}
    for (const [k, v] of Object.entries(after.host_reasons || {})) {
      const d = v - ((b.host_reasons || {})[k] || 0)
      if (d) reasons[k] = d
    }
    return {
      policy: after.policy,
      executor: after.executor,
      ane_ops: num('ane_ops'),
      host_ops: num('host_ops'),
      host_reasons: reasons,
      faults: num('faults')
    }
  }

  /**
   * The addon's stats (`resp.stats`) with the backend's next to them under `coreml`:
   * `{ ...resp.stats, coreml: { policy, executor, aneOps, hostOps, hostReasons, faults } }`.
   */
  report (addonStats = {}) {
    const s = this.stats()
    return {
      ...addonStats,
      coreml: s && {
        policy: s.policy,
        executor: s.executor,
        aneOps: s.ane_ops,
        hostOps: s.host_ops,
        hostReasons: s.host_reasons || {},
        faults: s.faults,
        ageMs: s.ageMs
      }
    }
  }
}

/**
 * Enables ggml-coreml for the QVAC addons of this process. Call it before the first model.load()
 * of any QVAC addon: fabric reads GGML_BACKEND_PATH once, when it loads its backends.
 *
 * Options: `library` (path of libggml-coreml; default: $GGML_COREML_LIBRARY, the package's
 * prebuilds, a checkout's target/release), `policy` ('latency' | 'energy' | 'off' | 'always';
 * default $GGML_COREML_POLICY, else per device), `stateDir` (where the control and stats files
 * live; default a fresh directory under the temp dir), `log` ('error' | 'warn' | 'info' | 'debug').
 */
function enable (opts = {}) {
  if (current) {
    if (opts.library && path.resolve(opts.library) !== current.library) {
      throw new Error(`ggml-coreml is already enabled with ${current.library}; a process has one ggml backend registry`)
    }
    if (opts.policy) current.setPolicy(opts.policy)
    return current
  }
  let policy = opts.policy || getEnv(ENV.policy)
  let policyReason = opts.policy ? 'option' : 'GGML_COREML_POLICY'
  if (!policy) ({ policy, reason: policyReason } = defaultPolicy(opts.device))
  checkPolicy(policy)

  const library = locateLibrary(opts)
  if (!library) {
    throw new Error(`libggml-coreml not found; tried: ${libraryCandidates(opts).join(', ')} (pass { library } or set ${ENV.library})`)
  }
  const stateDir = opts.stateDir
    ? path.resolve(opts.stateDir)
    : path.join(os.tmpdir(), `ggml-coreml-qvac-${os.pid()}-${Date.now().toString(36)}`)
  fs.mkdirSync(stateDir, { recursive: true })
  const controlFile = path.join(stateDir, 'control')
  const statsFile = path.join(stateDir, 'stats.json')
  writeAtomic(controlFile, `policy=${policy}\n`)
  try {
    fs.unlinkSync(statsFile)
  } catch {}

  os.setEnv(ENV.backendPath, library)
  os.setEnv(ENV.policy, policy)
  os.setEnv(ENV.control, controlFile)
  os.setEnv(ENV.stats, statsFile)
  if (opts.log) os.setEnv(ENV.log, String(opts.log))

  current = new CoreMLBackend({ library, policy, policyReason, controlFile, statsFile, stateDir })
  return current
}

/** The backend enabled in this process, or null. */
function enabled () {
  return current
}

module.exports = {
  POLICIES,
  ENV,
  enable,
  enabled,
  defaultPolicy,
  detectDevice,
  appleChipGeneration,
  locateLibrary,
  libraryCandidates,
  libraryFileName,
  CoreMLBackend
}
