'use strict'
// Shared by the integration tests: where the external things are, and child Bare processes.

const os = require('bare-os')
const path = require('bare-path')
const fs = require('bare-fs')
const { spawn } = require('bare-subprocess')

function env (name) {
  const v = os.hasEnv(name) ? os.getEnv(name) : undefined
  return v === undefined || v === '' ? null : v
}

/**
 * The library, models dir and embedding model from GGML_COREML_LIB, GGML_COREML_MODELS and
 * GGML_COREML_BERT_MODEL, or null (with the reason) when one is missing. With
 * GGML_COREML_REQUIRE_EXTERNAL=1 (CI) a missing one is an error, not a skip.
 */
function external () {
  const lib = env('GGML_COREML_LIB')
  const models = env('GGML_COREML_MODELS')
  const bert = env('GGML_COREML_BERT_MODEL')
  const missing = []
  if (!lib || !fs.existsSync(lib)) missing.push('GGML_COREML_LIB (the built libggml-coreml)')
  if (!models || !fs.existsSync(models)) missing.push('GGML_COREML_MODELS (the prepared models dir)')
  if (!bert || !fs.existsSync(bert)) missing.push('GGML_COREML_BERT_MODEL (tools/gen_bert_tiny.py output)')
  const why = missing.length ? `skipped: set ${missing.join(', ')} (cargo xtask qvac does)` : null
  if (why && env('GGML_COREML_REQUIRE_EXTERNAL') === '1') throw new Error(why.replace('skipped', 'missing'))
  return why ? { why } : { lib, models, bert, model: (name) => path.join(models, name) }
}

// Variables a child must not inherit from the test process (unit tests call enable() in it).
const CLEAN = ['GGML_BACKEND_PATH', 'GGML_COREML_POLICY', 'GGML_COREML_CONTROL', 'GGML_COREML_STATS_FILE', 'GGML_COREML_VARIANT']

/**
 * Runs test/fixtures/run.js with `spec` in a new Bare process; resolves to its RESULT object.
 * `extraEnv` adds variables (e.g. GGML_COREML_VARIANT).
 */
function runChild (spec, extraEnv = {}) {
  const childEnv = {}
  for (const k of os.getEnvKeys()) {
    if (!CLEAN.includes(k)) childEnv[k] = os.getEnv(k)
  }
  Object.assign(childEnv, extraEnv)
  const script = path.join(__dirname, 'fixtures', 'run.js')
  return new Promise((resolve, reject) => {
    const child = spawn(os.execPath(), [script, JSON.stringify(spec)], { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] })
    const out = []
    const err = []
    child.stdout.on('data', (d) => out.push(d))
    child.stderr.on('data', (d) => err.push(d))
    child.on('exit', (code) => {
      const stdout = Buffer.concat(out).toString()
      const stderr = Buffer.concat(err).toString()
      const line = stdout.split('\n').find((l) => l.startsWith('RESULT '))
      if (code !== 0 || !line) {
        reject(new Error(`child exited ${code} for ${JSON.stringify(spec)}:\n${stderr.split('\n').slice(-20).join('\n')}`))
        return
      }
      resolve(JSON.parse(line.slice('RESULT '.length)))
    })
  })
}

/** Length of the common prefix of two arrays. */
function commonPrefix (a, b) {
  let i = 0
  while (i < a.length && i < b.length && a[i] === b[i]) i++
  return i
}

function cosine (a, b) {
  let dot = 0
  let na = 0
  let nb = 0
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i]
    na += a[i] * a[i]
    nb += b[i] * b[i]
  }
  return dot / Math.sqrt(na * nb)
}

module.exports = { external, runChild, commonPrefix, cosine }
