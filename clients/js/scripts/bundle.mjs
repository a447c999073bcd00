// Bundles of the client, with the pinned esbuild (devDependency):
//
//   node scripts/bundle.mjs demo          write src/serve/demo/notifyd-client.js (the demo page's copy)
//   node scripts/bundle.mjs check-demo    exit 1 when that committed copy differs from a fresh bundle
//   node scripts/bundle.mjs size          print the core's minified and gzipped size
//   node scripts/bundle.mjs test-app OUT  bundle test/react-app.jsx (React included) to OUT
//
// The demo copy is committed because `cargo build` compiles it into the binary and must
// not need node; tests/js_client.rs runs check-demo so that it never goes stale.
import { build } from 'esbuild';
import { readFileSync, writeFileSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import { fileURLToPath } from 'node:url';
import { dirname, join, relative } from 'node:path';

const here = dirname(dirname(fileURLToPath(import.meta.url)));
const demoFile = join(here, '..', '..', 'src', 'serve', 'demo', 'notifyd-client.js');
const BANNER =
  '// GENERATED FILE, do not edit: the @notifyd/client core (clients/js/src), bundled for the\n' +
  '// demo page. Regenerate with `cd clients/js && npm ci && npm run demo`; tests/js_client.rs\n' +
  '// fails when this copy differs from the sources.';

async function bundle(options) {
  const r = await build({ bundle: true, write: false, format: 'esm', target: 'es2020', logLevel: 'error', ...options });
  return r.outputFiles[0].contents;
}

const demo = () => bundle({ entryPoints: [join(here, 'src', 'index.ts')], banner: { js: BANNER }, legalComments: 'none' });

const [cmd, arg] = process.argv.slice(2);
if (cmd === 'demo') {
  writeFileSync(demoFile, await demo());
  console.log(`wrote ${relative(process.cwd(), demoFile)}`);
} else if (cmd === 'check-demo') {
  const want = Buffer.from(await demo());
  let have = Buffer.alloc(0);
  try {
    have = readFileSync(demoFile);
  } catch {}
  if (!want.equals(have)) {
    console.error(`${demoFile} is stale: it differs from a fresh bundle of clients/js/src. Run: cd clients/js && npm run demo`);
    process.exit(1);
  }
  console.log(`${relative(process.cwd(), demoFile)} is current (${have.length} bytes)`);
} else if (cmd === 'size') {
  const min = await bundle({ entryPoints: [join(here, 'src', 'index.ts')], minify: true });
  console.log(`core (dist/index.js and its imports), esbuild --bundle --minify: ${min.length} bytes, gzip -9: ${gzipSync(min, { level: 9 }).length} bytes`);
} else if (cmd === 'test-app' && arg) {
  const js = await bundle({
    entryPoints: [join(here, 'test', 'react-app.jsx')],
    jsx: 'automatic',
    minify: true,
    define: { 'process.env.NODE_ENV': '"production"' },
  });
  writeFileSync(arg, js);
  console.log(`wrote ${arg} (${js.length} bytes)`);
} else {
  console.error('usage: node scripts/bundle.mjs demo | check-demo | size | test-app OUT');
  process.exit(2);
}
