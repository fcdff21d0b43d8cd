/** ANE scheduling policy of ggml-coreml. 'always' offloads every supported matmul (tests). */
export type AnePolicy = 'latency' | 'energy' | 'off' | 'always'

export const POLICIES: readonly AnePolicy[]

/** Environment variables the package sets (and reads). */
export const ENV: {
  readonly backendPath: 'GGML_BACKEND_PATH'
  readonly policy: 'GGML_COREML_POLICY'
  readonly control: 'GGML_COREML_CONTROL'
  readonly stats: 'GGML_COREML_STATS_FILE'
  readonly log: 'GGML_COREML_LOG'
  readonly library: 'GGML_COREML_LIBRARY'
}

export interface Device {
  /** os.platform(): 'darwin', 'ios', 'linux', 'android', 'win32', … */
  platform: string
  /** os.arch(): 'arm64', 'x64', … */
  arch: string
  /** The first CPU's model string, e.g. "Apple M4 Pro". */
  cpuModel: string
}

export interface EnableOptions {
  /** Path of libggml-coreml (.so / .dylib). Default: $GGML_COREML_LIBRARY, prebuilds/<platform>-<arch>/, a checkout's target/release. */
  library?: string
  /** Initial policy. Default: $GGML_COREML_POLICY, else the per-device default. */
  policy?: AnePolicy
  /** Directory for the control and stats files. Default: a new directory under the temp dir. */
  stateDir?: string
  /** Backend log level (GGML_COREML_LOG). */
  log?: 'error' | 'warn' | 'info' | 'debug'
  /** Device used for the per-device default (tests). */
  device?: Device
  platform?: string
  arch?: string
}

/** The backend's statistics file (same JSON as ggml_backend_coreml_get_stats) plus its age. */
export interface BackendStats {
  policy: AnePolicy
  executor: string
  ane_ops: number
  host_ops: number
  host_reasons: Record<string, number>
  faults: number
  ane_ms?: number
  host_ms?: number
  weights_prepared?: number
  /** Milliseconds since the backend wrote the snapshot. */
  ageMs: number | null
  [key: string]: unknown
}

export interface StatsDelta {
  policy: AnePolicy
  executor: string
  ane_ops: number
  host_ops: number
  host_reasons: Record<string, number>
  faults: number
}

export interface CoreMLReport {
  policy: AnePolicy
  executor: string
  aneOps: number
  hostOps: number
  hostReasons: Record<string, number>
  faults: number
  ageMs: number | null
}

export class CoreMLBackend {
  /** Absolute path of the library on GGML_BACKEND_PATH. */
  readonly library: string
  readonly controlFile: string
  readonly statsFile: string
  readonly stateDir: string
  /** Why the current policy was chosen ('option', 'GGML_COREML_POLICY', a per-device rule, 'set at run time'). */
  policyReason: string
  /** The policy last set; the backend applies it at its next graph. */
  readonly policy: AnePolicy
  /** Switches the policy at run time (applied at the backend's next graph, within 250 ms). */
  setPolicy(policy: AnePolicy): this
  /** Latest statistics snapshot, or null before the backend's first graph. May lag by up to 500 ms; exact after unload(). */
  stats(): BackendStats | null
  /** Counters that grew since `before`. */
  delta(before: BackendStats | null, after?: BackendStats | null): StatsDelta | null
  /** The addon's stats with the backend's under `coreml`. */
  report<T extends object>(addonStats?: T): T & { coreml: CoreMLReport | null }
}

/** Enables ggml-coreml for this process's QVAC addons; call before the first model.load(). Idempotent. */
export function enable(opts?: EnableOptions): CoreMLBackend
/** The backend enabled in this process, or null. */
export function enabled(): CoreMLBackend | null
/** Per-device default: iOS -> energy, Mac M4+ -> latency, older Mac -> off, Linux -> latency, others -> off. */
export function defaultPolicy(device?: Device): { policy: AnePolicy; reason: string }
export function detectDevice(): Device
/** "Apple M4 Pro" -> 4; null for anything else. */
export function appleChipGeneration(cpuModel: string): number | null
/** Absolute path of the first existing library candidate, or null. */
export function locateLibrary(opts?: EnableOptions): string | null
export function libraryCandidates(opts?: EnableOptions): string[]
export function libraryFileName(platform?: string): string
