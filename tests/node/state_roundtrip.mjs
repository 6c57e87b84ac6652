// One state-service round trip from Node.js: append, a conditional append,
// a stale etag refused with ABORTED/ETAG_MISMATCH and handled the AIP-154 way
// (re-read, retry on the fresh etag), then GetContext. Prints one JSON line.
// usage: node state_roundtrip.mjs ADDRESS PROTOS_DIR GOOGLE_PROTOS_DIR
import { call, errorReason, grpc, load } from "./load.mjs";

const [address, protosDir, googleDir] = process.argv.slice(2);
const api = load(protosDir, googleDir, "statecar/state/v1/state_service.proto").statecar.state.v1;
const state = new api.StateService(address, grpc.credentials.createInsecure());
const session = `node-${process.pid}`;
const item = (role, content) => ({ json: JSON.stringify({ role, content }) });

const first = await call(state, "AppendItems", {
  session_id: session,
  items: [item("user", "Hello from Node"), item("assistant", "Hello, Node!")],
  request_id: `${session}-1`,
});
const second = await call(state, "AppendItems", {
  session_id: session,
  items: [item("user", "Second turn")],
  etag: first.etag,
});

let conflict = null;
try {
  // Based on the first etag, which the second append made stale.
  await call(state, "AppendItems", { session_id: session, items: [item("user", "lost?")], etag: first.etag });
} catch (error) {
  conflict = { code: grpc.status[error.code], reason: errorReason(googleDir, error) };
  // Handling: read the current etag and decide again (here: append anyway).
  const head = await call(state, "GetSession", { session_id: session });
  await call(state, "AppendItems", {
    session_id: session,
    items: [item("user", "retried on the fresh etag")],
    etag: head.session.etag,
  });
}

const context = await call(state, "GetContext", { session_id: session, token_budget: 1000 });
console.log(
  JSON.stringify({
    first_seq: Number(first.first_seq),
    last_seq: Number(second.last_seq),
    conflict,
    contents: context.items.map((i) => JSON.parse(i.json).content),
    etag: context.etag,
  }),
);
state.close();
