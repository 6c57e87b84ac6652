// A conversation through the agent API from Node.js: two Chat turns on one
// session (the second must see the first: the offline model recalls the
// name), a retried turn recognised by its request_id, and a streamed turn.
// Prints one JSON line. usage: node agent_conversation.mjs ADDRESS PROTOS_DIR GOOGLE_PROTOS_DIR
import { call, grpc, load } from "./load.mjs";

const [address, protosDir, googleDir] = process.argv.slice(2);
const api = load(protosDir, googleDir, "statecar/agent/v1/agent_service.proto").statecar.agent.v1;
const agents = new api.AgentService(address, grpc.credentials.createInsecure());
const session = `node-chat-${process.pid}`;

const introduce = { session_id: session, message: "Hi! My name is Ada.", request_id: `${session}-1` };
const first = await call(agents, "Chat", introduce, 30);
const second = await call(agents, "Chat", { session_id: session, message: "What is my name?" }, 30);
const retried = await call(agents, "Chat", introduce, 30);

const streamed = await new Promise((resolve, reject) => {
  const events = [];
  const stream = agents.StreamChat(
    { session_id: session, message: "Thanks, bye!" },
    { deadline: new Date(Date.now() + 30_000) },
  );
  stream.on("data", (event) => events.push(event.event));
  stream.on("error", reject);
  stream.on("end", () => resolve(events));
});

console.log(
  JSON.stringify({
    first: first.reply,
    second: second.reply,
    retried_replayed: retried.replayed,
    retried_same_reply: retried.reply === first.reply,
    stream_events: streamed,
  }),
);
agents.close();
