// Renders Spillway's dashboard tables with Grafana's own code, and type-checks dashboard JSON
// against Grafana's own schema types. Run by tests/test_dashboards_grafana.py:
//
//   node tests/grafana/render.cjs <node_modules parent> <request.json>
//
// request.json: {"typecheck": {name: dashboard JSON, ...},
//                "tables": [{"id", "transformations", "targets": [{"refId", "result": <Prometheus
//                            instant-vector result>}]}]}
// prints {"typecheck": {name: [diagnostic, ...]}, "tables": {id: [{"name", "fields": [{"name",
//         "display", "values"}]}]}}.
//
// Tables: each target's Prometheus result becomes the data frame Grafana's Prometheus data source
// makes of a `format: table` query (public/app/plugins/datasource/prometheus, transformDFToTable:
// a Time field, one string field per label in sorted order, then the value field, named `Value`
// when the panel has one query and `Value #<refId>` when it has several), then the panel's
// transformations run through @grafana/data's transformDataFrame with Grafana's standard
// transformers. Type check: every dashboard is a literal of @grafana/schema's `Dashboard` type,
// compiled by TypeScript with --strict (excess properties and wrong types are errors).
'use strict';

const fs = require('fs');
const path = require('path');
const os = require('os');
const { createRequire } = require('module');

const [, , modulesDir, requestPath] = process.argv;
if (!modulesDir || !requestPath) {
  console.error('usage: node render.cjs <dir holding node_modules> <request.json>');
  process.exit(2);
}
const req = createRequire(path.join(path.resolve(modulesDir), 'package.json'));
const data = req('@grafana/data');
// Grafana's code runs in a browser: transformDataFrame reads `window` (only to ask whether a
// Scenes dashboard is active; it is not). Set after loading, so no module takes node for a browser.
globalThis.window = globalThis.window || {};
const request = JSON.parse(fs.readFileSync(requestPath, 'utf8'));

function tableFrame(refId, result, manyQueries) {
  const labels = [...new Set(result.flatMap((s) => Object.keys(s.metric)))].sort();
  const fields = [
    { name: 'Time', type: data.FieldType.time, config: {}, values: result.map((s) => Number(s.value[0]) * 1000) },
    ...labels.map((l) => ({
      name: l,
      type: data.FieldType.string,
      config: { filterable: true },
      values: result.map((s) => (Object.prototype.hasOwnProperty.call(s.metric, l) ? s.metric[l] : '')),
    })),
    {
      name: manyQueries ? `Value #${refId}` : 'Value',
      type: data.FieldType.number,
      config: {},
      values: result.map((s) => Number(s.value[1])),
    },
  ];
  return { refId, fields, length: result.length, meta: { preferredVisualisationType: 'rawPrometheus' } };
}

function initTransformers() {
  // As Grafana's app does (features/transformers/standardTransformers.ts), without the editors;
  // two exports share an id (seriesToColumns is joinByField's old name): register it once.
  const byId = new Map(Object.values(data.standardTransformers).map((t) => [t.id, t]));
  data.standardTransformersRegistry.setInit(() =>
    [...byId.values()].map((t) => ({ id: t.id, name: t.name, description: t.description, transformation: () => Promise.resolve(t) })),
  );
}

async function renderTable(table) {
  const frames = table.targets.map((t) => tableFrame(t.refId, t.result, table.targets.length > 1));
  const out = await new Promise((resolve, reject) => {
    // The panel's transformations, with variables interpolated as Grafana does (none are used).
    const ctx = { interpolate: (v) => v };
    data.transformDataFrame(table.transformations, frames, ctx).subscribe({ next: resolve, error: reject });
  });
  return out.map((frame) => ({
    name: frame.name || frame.refId || '',
    fields: frame.fields.map((f) => ({
      name: f.name,
      display: data.getFieldDisplayName(f, frame, out),
      values: Array.from(f.values),
    })),
  }));
}

function typecheck(dashboards) {
  const ts = req('typescript');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'spillway-dash-'));
  const files = {};
  for (const [name, board] of Object.entries(dashboards)) {
    const file = path.join(dir, `${name.replace(/[^A-Za-z0-9_-]/g, '_')}.ts`);
    fs.writeFileSync(file, `import type { Dashboard } from '@grafana/schema';\n` +
      `export const dashboard: Dashboard = ${JSON.stringify(board, null, 2)};\n`);
    files[file] = name;
  }
  const program = ts.createProgram(Object.keys(files), {
    strict: true,
    noEmit: true,
    skipLibCheck: true,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    target: ts.ScriptTarget.ES2022,
    typeRoots: [],
    types: [],
    baseUrl: dir,
    paths: { '@grafana/schema': [path.join(path.resolve(modulesDir), 'node_modules', '@grafana', 'schema')] },
  });
  const out = Object.fromEntries(Object.values(files).map((n) => [n, []]));
  for (const d of ts.getPreEmitDiagnostics(program)) {
    const name = d.file ? files[d.file.fileName] : undefined;
    let where = '';
    if (d.file && d.start !== undefined) {
      const { line } = d.file.getLineAndCharacterOfPosition(d.start);
      where = `line ${line + 1}: `;
    }
    const text = where + ts.flattenDiagnosticMessageText(d.messageText, '\n');
    (name ? out[name] : (out['<global>'] = out['<global>'] || [])).push(text);
  }
  fs.rmSync(dir, { recursive: true, force: true });
  return out;
}

(async () => {
  initTransformers();
  const result = { typecheck: {}, tables: {} };
  if (request.typecheck) {
    result.typecheck = typecheck(request.typecheck);
  }
  for (const table of request.tables || []) {
    result.tables[table.id] = await renderTable(table);
  }
  process.stdout.write(JSON.stringify(result));
})().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
