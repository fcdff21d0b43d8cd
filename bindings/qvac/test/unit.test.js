'use strict'
// The package without models: per-device defaults, library discovery, environment and file
// controls. Runs in this process (enable() sets this process's environment; integration tests
// start their children with a clean one).

const test = require('brittle')
const fs = require('bare-fs')
const os = require('bare-os')
const path = require('bare-path')
const qvac = require('..')

test('per-device default policy', (t) => {
  const d = (platform, arch, cpuModel) => qvac.defaultPolicy({ platform, arch, cpuModel }).policy
  t.is(d('ios', 'arm64', 'Apple A17 Pro'), 'energy', 'iPhone -> energy')
  t.is(d('ios', 'arm64', ''), 'energy', 'iPad (no model string) -> energy')
  t.is(d('darwin', 'arm64', 'Apple M4'), 'latency', 'M4 -> latency')
  t.is(d('darwin', 'arm64', 'Apple M5 Max'), 'latency', 'M5 Max -> latency')
  t.is(d('darwin', 'arm64', 'Apple M3 Pro'), 'off', 'M3 Pro -> off')
  t.is(d('darwin', 'arm64', 'Apple M1'), 'off', 'M1 -> off')
  t.is(d('darwin', 'x64', 'Intel(R) Core(TM) i9-9980HK'), 'off', 'Intel Mac -> off')
  t.is(d('linux', 'x64', 'Intel Xeon'), 'latency', 'Linux -> latency (declined by the backend)')
  t.is(d('android', 'arm64', ''), 'off', 'Android -> off')
  t.is(d('win32', 'x64', ''), 'off', 'Windows -> off')
  t.is(qvac.appleChipGeneration('Apple M10 Ultra'), 10, 'two-digit generations')
  t.is(qvac.appleChipGeneration('Apple A18'), null, 'A-series is not an M chip')
  t.ok(qvac.POLICIES.includes(qvac.defaultPolicy().policy), 'this machine gets a known policy')
})

test('library discovery', (t) => {
  // The environment would be the only candidate; this test looks at the defaults.
  if (os.hasEnv('GGML_COREML_LIBRARY')) os.unsetEnv('GGML_COREML_LIBRARY')
  t.is(qvac.libraryFileName('darwin'), 'libggml-coreml.dylib')
  t.is(qvac.libraryFileName('ios'), 'libggml-coreml.dylib')
  t.is(qvac.libraryFileName('linux'), 'libggml-coreml.so')
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'qvac-unit-'))
  const lib = path.join(tmp, 'libggml-coreml.so')
  fs.writeFileSync(lib, 'not really a library')
  t.is(qvac.locateLibrary({ library: lib }), lib, 'the option wins')
  t.alike(qvac.libraryCandidates({ library: lib }), [lib], 'an explicit path is the only candidate')
  const cands = qvac.libraryCandidates({ platform: 'linux', arch: 'x64' })
  t.ok(cands.some((c) => c.endsWith(path.join('prebuilds', 'linux-x64', 'libggml-coreml.so'))), 'package prebuilds')
  t.ok(cands.some((c) => c.endsWith(path.join('target', 'release', 'libggml-coreml.so'))), 'a checkout target dir')
  t.is(qvac.locateLibrary({ library: path.join(tmp, 'absent.so') }), null, 'a missing explicit path -> null')
})

test('bad input is an error, not a crash', (t) => {
  t.exception.all(() => qvac.enable({ policy: 'fastest' }), /unknown ANE policy/)
  t.exception(() => qvac.enable({ library: '/nonexistent/libggml-coreml.so', policy: 'off' }), /not found/)
  t.is(qvac.enabled(), null, 'nothing enabled after failures')
})

test('enable: environment and file controls', (t) => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'qvac-unit-'))
  const lib = path.join(tmp, 'libggml-coreml.so')
  fs.writeFileSync(lib, 'stand-in')
  const b = qvac.enable({ library: lib, policy: 'energy', stateDir: path.join(tmp, 'state') })
  t.is(qvac.enabled(), b)
  t.is(os.getEnv('GGML_BACKEND_PATH'), lib, 'GGML_BACKEND_PATH is the absolute library path')
  t.is(os.getEnv('GGML_COREML_POLICY'), 'energy')
  t.is(os.getEnv('GGML_COREML_CONTROL'), b.controlFile)
  t.is(os.getEnv('GGML_COREML_STATS_FILE'), b.statsFile)
  t.is(fs.readFileSync(b.controlFile, 'utf8'), 'policy=energy\n')
  t.is(b.policy, 'energy')
  t.is(b.policyReason, 'option')

  b.setPolicy('off')
  t.is(fs.readFileSync(b.controlFile, 'utf8'), 'policy=off\n', 'setPolicy rewrites the control file')
  t.is(os.getEnv('GGML_COREML_POLICY'), 'off', 'and the environment, for a backend not yet initialised')
  t.exception.all(() => b.setPolicy('turbo'), /unknown ANE policy/)
  t.is(b.policy, 'off', 'a rejected policy changes nothing')

  t.is(qvac.enable({ policy: 'always' }), b, 'one backend per process')
  t.is(b.policy, 'always', 'a later enable() with a policy switches it')
  t.exception(() => qvac.enable({ library: path.join(tmp, 'other.so') }), /already enabled/)

  t.is(b.stats(), null, 'no stats before the backend wrote any')
  fs.writeFileSync(b.statsFile, '{"policy":"always","executor":"reference","ane_ops":3,"host_ops":1,"host_reasons":{"policy off":1},"faults":0}')
  const s = b.stats()
  t.is(s.ane_ops, 3)
  t.ok(s.ageMs >= 0, 'snapshot age')
  const d = b.delta({ ane_ops: 1, host_ops: 1, host_reasons: {} })
  t.alike(d, { policy: 'always', executor: 'reference', ane_ops: 2, host_ops: 0, host_reasons: { 'policy off': 1 }, faults: 0 })
  const r = b.report({ TPS: 10, backendDevice: 'cpu' })
  t.is(r.TPS, 10, 'addon stats kept')
  t.is(r.coreml.aneOps, 3, 'backend stats beside them')
  fs.writeFileSync(b.statsFile, '{"truncated')
  t.is(b.stats(), null, 'a torn file reads as no stats')
})
