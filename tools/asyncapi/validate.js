#!/usr/bin/env node
// Parses an AsyncAPI document with the official parser (@asyncapi/parser) and prints every
// diagnostic it reports, one per line: `<severity> <path>: <message> [<rule>]`.
//
//   node tools/asyncapi/validate.js DOCUMENT.json [--fail-on-warnings]
//
// Exit status: 0 valid; 1 the parser reported an error (or, with --fail-on-warnings, a
// warning); 2 the file could not be read or the arguments were wrong.
'use strict';

const fs = require('node:fs');
const { Parser, DiagnosticSeverity } = require('@asyncapi/parser');

const SEVERITY = {
  [DiagnosticSeverity.Error]: 'error',
  [DiagnosticSeverity.Warning]: 'warning',
  [DiagnosticSeverity.Information]: 'info',
  [DiagnosticSeverity.Hint]: 'hint',
};

async function main(argv) {
  const flags = argv.filter((arg) => arg.startsWith('--'));
  const files = argv.filter((arg) => !arg.startsWith('--'));
  const unknown = flags.filter((flag) => flag !== '--fail-on-warnings');
  if (files.length !== 1 || unknown.length > 0) {
    process.stderr.write('usage: validate.js DOCUMENT.json [--fail-on-warnings]\n');
    return 2;
  }
  const [file] = files;
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (error) {
    process.stderr.write(`cannot read ${file}: ${error.message}\n`);
    return 2;
  }

  const parser = new Parser();
  const { document, diagnostics } = await parser.parse(text, { source: file });
  const counts = { error: 0, warning: 0, info: 0, hint: 0 };
  for (const diagnostic of diagnostics) {
    const severity = SEVERITY[diagnostic.severity] || 'error';
    counts[severity] += 1;
    const where = (diagnostic.path || []).join('.') || '(document)';
    process.stdout.write(`${severity} ${where}: ${diagnostic.message} [${diagnostic.code}]\n`);
  }
  const failOnWarnings = flags.includes('--fail-on-warnings');
  const failed =
    document === undefined || counts.error > 0 || (failOnWarnings && counts.warning > 0);
  const summary = `${counts.error} errors, ${counts.warning} warnings, ${counts.info} infos`;
  if (failed) {
    process.stdout.write(`invalid: ${file}: ${summary}\n`);
    return 1;
  }
  const version = document.version();
  process.stdout.write(`valid: ${file}: AsyncAPI ${version}, ${summary}\n`);
  return 0;
}

main(process.argv.slice(2)).then(
  (status) => {
    process.exitCode = status;
  },
  (error) => {
    process.stderr.write(`validation crashed: ${error && error.stack ? error.stack : error}\n`);
    process.exitCode = 2;
  },
);
