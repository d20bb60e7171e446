// Node's @grpc/grpc-js (an independent gRPC stack on nghttp2's HPACK) against a keybroker
// Unix socket, with default channel options. Run by tests/interop.rs with NODE_PATH pointing
// at the modules scripts/test-setup installs (target/test-env/node/node_modules):
//
//   argv: <unix:///path/to.sock> <proto/keybroker/v1/keybroker.proto>
//
// Each check prints "ok <name> ..." or "FAIL <name> ..."; the exit status is the number of
// failures.

const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const path = require("path");

const [target, protoFile] = process.argv.slice(2);
const definition = protoLoader.loadSync(protoFile, {
  // The proto root (proto/), for google/rpc/status.proto (batch results).
  includeDirs: [path.resolve(path.dirname(protoFile), "..", "..")],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
});
const pkg = grpc.loadPackageDefinition(definition);
const client = new pkg.keybroker.v1.KeyBroker(target, grpc.credentials.createInsecure());

let failures = 0;
function check(name, ok, detail) {
  console.log(`${ok ? "ok" : "FAIL"} ${name}${detail ? " " + detail : ""}`);
  if (!ok) failures += 1;
}

function call(method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 10000);
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

/** The ErrorInfo reason in grpc-status-details-bin (google.rpc.Status, decoded by hand:
 * field 3 = details (Any), Any field 2 = value, ErrorInfo field 1 = reason). */
function reason(err) {
  const bin = err.metadata && err.metadata.get("grpc-status-details-bin")[0];
  if (!bin) return "";
  const fields = (buf) => {
    const out = [];
    let i = 0;
    const varint = () => {
      let v = 0, shift = 0, b;
      do { b = buf[i++]; v += (b & 0x7f) * 2 ** shift; shift += 7; } while (b & 0x80);
      return v;
    };
    while (i < buf.length) {
      const tag = varint();
      if ((tag & 7) === 2) { const n = varint(); out.push([tag >> 3, buf.subarray(i, i + n)]); i += n; }
      else if ((tag & 7) === 0) varint();
      else break;
    }
    return out;
  };
  for (const [f, any] of fields(bin)) {
    if (f !== 3) continue;
    for (const [g, value] of fields(any)) {
      if (g !== 2) continue;
      for (const [h, r] of fields(value)) if (h === 1) return Buffer.from(r).toString();
    }
  }
  return "";
}

(async () => {
  const plaintext = Buffer.alloc(50000, 7);
  let enc;
  try {
    for (let i = 0; i < 5; i++) {
      const context = { app: "grpc-js", i: String(i) };
      enc = await call("Encrypt", { key: "default", plaintext, context });
      const dec = await call("Decrypt", { ciphertext: enc.ciphertext, context });
      if (!Buffer.from(dec.plaintext).equals(plaintext)) throw new Error("plaintext changed");
    }
    check("round-trip", true, `key=${enc.key} version=${enc.key_version}`);
  } catch (e) {
    check("round-trip", false, `${e.code} ${e.details || e.message}`);
  }
  try {
    await call("Decrypt", { ciphertext: enc ? enc.ciphertext : Buffer.alloc(0), context: { app: "other" } });
    check("wrong-context", false, "decrypted under the wrong context");
  } catch (e) {
    const r = reason(e);
    check("wrong-context", e.code === grpc.status.INVALID_ARGUMENT && r === "DECRYPTION_FAILED", `${e.code} ${r}`);
  }
  try {
    await call("Encrypt", { key: "k".repeat(1 << 20), plaintext: Buffer.from("x") });
    check("long-key", false, "accepted");
  } catch (e) {
    const r = reason(e);
    const len = (e.details || "").length;
    check("long-key", e.code === grpc.status.INVALID_ARGUMENT && r === "INVALID_ARGUMENT" && len < 1024, `${e.code} ${r} message=${len}B`);
  }
  client.close();
  process.exit(failures);
})();
