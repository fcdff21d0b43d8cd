'use strict'
// The whole suite in one Bare process: `bare test/all.js` (cargo xtask qvac runs it).
require('./unit.test.js')
require('./addons.test.js')
