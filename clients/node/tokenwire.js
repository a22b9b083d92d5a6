#!/usr/bin/env node
// tokenwire Node.js client: the same gRPC contract as the Python CLI, loaded from the
// .proto at runtime (no generated code).
//
//   node tokenwire.js models [--json] [--server host:port]
//   node tokenwire.js generate "prompt" [--model ID] [--max-tokens N] [--temperature T]
//        [--seed S] [--system TEXT] [--chat] [--json] [--server host:port]
//
// Errors (bad arguments, server down, failed generation) print one line on stderr and exit
// non-zero: 2 for usage errors, 1 otherwise, 130 on Ctrl-C.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILE = 'tokenwire/v1/inference.proto';
const DEFAULT_TARGET = '127.0.0.1:50051';

class UsageError extends Error {}

function fail(message, code = 1) {
  process.stderr.write(`tokenwire-node: ${message}\n`);
  process.exit(code);
}

function loadInference() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the .proto (max_tokens, token_id)
    longs: String, // uint64 (parameter_count, size_bytes) without precision loss
    enums: String, // "FINISH_REASON_STOP", "MODEL_STATE_LOADED"
    defaults: true,
    oneofs: true, // GenerateResponse.event names the set member
  });
  return grpc.loadPackageDefinition(definition).tokenwire.v1;
}

// ---- arguments ---------------------------------------------------------------------------------

const FLAGS = {
  models: { '--server': 'string', '--json': 'bool' },
  generate: {
    '--server': 'string',
    '--model': 'string',
    '--max-tokens': 'int',
    '--temperature': 'float',
    '--top-p': 'float',
    '--top-k': 'int',
    '--seed': 'int',
    '--system': 'string',
    '--stop': 'list',
    '--chat': 'bool',
    '--json': 'bool',
  },
};

function parseArgs(argv) {
  const [command, ...rest] = argv;
  if (!command || command === '-h' || command === '--help') {
    return { command: 'help' };
  }
  const spec = FLAGS[command];
  if (!spec) throw new UsageError(`unknown command '${command}' (use 'models' or 'generate')`);
  const opts = { positional: [] };
  for (let i = 0; i < rest.length; i++) {
    let arg = rest[i];
    let inline;
    if (arg.startsWith('--') && arg.includes('=')) {
      [arg, inline] = [arg.slice(0, arg.indexOf('=')), arg.slice(arg.indexOf('=') + 1)];
    }
    if (!arg.startsWith('--') || arg === '-') {
      opts.positional.push(arg);
      continue;
    }
    const kind = spec[arg];
    if (!kind) throw new UsageError(`unknown option ${arg} for '${command}'`);
    const key = arg.slice(2).replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (kind === 'bool') {
      opts[key] = true;
      continue;
    }
    const raw = inline !== undefined ? inline : rest[++i];
    if (raw === undefined) throw new UsageError(`${arg} needs a value`);
    if (kind === 'int') {
      if (!/^\d+$/.test(raw)) throw new UsageError(`${arg} must be a non-negative integer, got '${raw}'`);
      opts[key] = raw; // kept as a string: --seed is uint64
    } else if (kind === 'float') {
      const value = Number(raw);
      if (raw.trim() === '' || !Number.isFinite(value)) throw new UsageError(`${arg} must be a number, got '${raw}'`);
      opts[key] = value;
    } else if (kind === 'list') {
      (opts[key] = opts[key] || []).push(raw);
    } else {
      opts[key] = raw;
    }
  }
  return { command, opts };
}

const USAGE = `usage:
  node tokenwire.js models [--json] [--server host:port]
  node tokenwire.js generate PROMPT|- [--model ID] [--max-tokens N] [--temperature T]
      [--top-p P] [--top-k K] [--seed S] [--stop STR]... [--system TEXT] [--chat] [--json]
      [--server host:port]
The server defaults to $TOKENWIRE_SERVER or ${DEFAULT_TARGET}.`;

// ---- gRPC --------------------------------------------------------------------------------------

function describeError(err, target) {
  const details = String(err.details || err.message || '').replace(/\s*Resolution note:\s*$/, '');
  if (err.code === grpc.status.UNAVAILABLE) {
    return `cannot reach the tokenwire server at ${target}: is \`tokenwire serve\` running? (${details})`;
  }
  const name = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || 'ERROR';
  return `${name}: ${details}`;
}

function client(opts) {
  const target = opts.server || process.env.TOKENWIRE_SERVER || DEFAULT_TARGET;
  const { Inference } = loadInference();
  return { target, stub: new Inference(target, grpc.credentials.createInsecure()) };
}

function humanBytes(n) {
  let value = Number(n);
  for (const unit of ['B', 'KB', 'MB', 'GB']) {
    if (value < 1024 || unit === 'GB') return unit === 'B' ? `${value} B` : `${value.toFixed(1)} ${unit}`;
    value /= 1024;
  }
  return String(n);
}

function cmdModels(opts) {
  const { target, stub } = client(opts);
  const deadline = new Date(Date.now() + 30000);
  stub.ListModels({}, { deadline }, (err, reply) => {
    stub.close();
    if (err) fail(describeError(err, target));
    if (opts.json) {
      process.stdout.write(JSON.stringify(reply, null, 2) + '\n');
      return;
    }
    if (!reply.models.length) {
      process.stdout.write('no models in the store: run `tokenwire pull smollm2-135m`\n');
      return;
    }
    const rows = reply.models.map((m) => [
      m.id,
      m.architecture,
      Number(m.parameter_count) ? `${Math.round(Number(m.parameter_count) / 1e6)}M` : '?',
      m.precision,
      String(m.context_length),
      humanBytes(m.size_bytes),
      m.state.replace('MODEL_STATE_', '').toLowerCase() +
        (m.is_default ? ' (default)' : '') +
        (m.error_message ? ` — ${m.error_message}` : ''),
    ]);
    const header = ['ID', 'ARCH', 'PARAMS', 'PREC', 'CTX', 'SIZE', 'STATE'];
    const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
    const right = new Set([2, 4, 5]);
    const line = (r) =>
      r.map((c, i) => (i === r.length - 1 ? c : right.has(i) ? c.padStart(widths[i]) : c.padEnd(widths[i]))).join('  ');
    process.stdout.write([line(header), ...rows.map(line)].join('\n') + '\n');
  });
}

function readStdin() {
  return require('fs').readFileSync(0, 'utf8');
}

function buildRequest(opts) {
  if (opts.positional.length !== 1) throw new UsageError('generate takes exactly one PROMPT (or - for stdin)');
  const prompt = opts.positional[0] === '-' ? readStdin() : opts.positional[0];
  if (opts.maxTokens !== undefined && Number(opts.maxTokens) < 1) {
    throw new UsageError(`--max-tokens must be >= 1, got ${opts.maxTokens}`);
  }
  if (opts.temperature !== undefined && opts.temperature < 0) {
    throw new UsageError(`--temperature must be >= 0, got ${opts.temperature}`);
  }
  const sampling = {};
  if (opts.temperature !== undefined) sampling.temperature = opts.temperature;
  if (opts.topP !== undefined) sampling.top_p = opts.topP;
  if (opts.topK !== undefined) sampling.top_k = Number(opts.topK);
  if (opts.seed !== undefined) sampling.seed = opts.seed;
  const request = {
    model: opts.model || '',
    sampling,
    max_tokens: opts.maxTokens !== undefined ? Number(opts.maxTokens) : 0,
    stop: opts.stop || [],
  };
  if (opts.chat || opts.system !== undefined) {
    request.messages = [];
    if (opts.system !== undefined) request.messages.push({ role: 'system', content: opts.system });
    request.messages.push({ role: 'user', content: prompt });
  } else {
    request.prompt = prompt;
  }
  return request;
}

function cmdGenerate(opts) {
  const request = buildRequest(opts);
  const { target, stub } = client(opts);
  const call = stub.Generate(request);
  let finished = null;
  let interrupted = false;

  process.on('SIGINT', () => {
    interrupted = true;
    call.cancel();
  });

  call.on('data', (response) => {
    const kind = response.event;
    const event = response[kind];
    if (opts.json) {
      process.stdout.write(JSON.stringify({ [kind]: event }) + '\n');
    } else if (kind === 'token') {
      process.stdout.write(event.text);
    } else if (kind === 'queued') {
      process.stderr.write(`[queued: position ${event.position}]\n`);
    }
    if (kind === 'finished') finished = event;
  });

  call.on('error', (err) => {
    stub.close();
    if (interrupted || err.code === grpc.status.CANCELLED) {
      process.stderr.write('\n[stopped]\n');
      process.exit(130);
    }
    fail(describeError(err, target));
  });

  call.on('end', () => {
    stub.close();
    if (!opts.json) process.stdout.write('\n');
    if (finished && finished.reason === 'FINISH_REASON_ERROR') {
      fail(`generation failed: ${finished.error_message}`);
    }
    if (!finished) fail('the stream ended without a finished event');
  });
}

function main() {
  let parsed;
  try {
    parsed = parseArgs(process.argv.slice(2));
    if (parsed.command === 'help') {
      process.stdout.write(USAGE + '\n');
      return;
    }
    if (parsed.command === 'models') {
      if (parsed.opts.positional.length) throw new UsageError(`models takes no arguments, got '${parsed.opts.positional[0]}'`);
      cmdModels(parsed.opts);
    } else {
      cmdGenerate(parsed.opts);
    }
  } catch (err) {
    if (err instanceof UsageError) fail(`${err.message} (see --help)`, 2);
    fail(err.message || String(err));
  }
}

process.stdout.on('error', (err) => {
  if (err.code === 'EPIPE') process.exit(0);
  throw err;
});

main();
