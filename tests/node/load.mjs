// Loads statecar's protos at run time (no generated code), as any Node.js
// backend would. The protos directory and the directory holding
// google/rpc/*.proto come from the test (tests/test_node_client.py).
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

export function load(protosDir, googleDir, file) {
  const definition = protoLoader.loadSync(file, { ...OPTIONS, includeDirs: [protosDir, googleDir] });
  return grpc.loadPackageDefinition(definition);
}

// The google.rpc.ErrorInfo reason of a failed call, read from the
// grpc-status-details-bin trailer (a serialized google.rpc.Status).
export function errorReason(googleDir, error) {
  const raw = error.metadata?.get("grpc-status-details-bin")?.[0];
  if (!raw) return "";
  const types = protoLoader.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], {
    ...OPTIONS,
    includeDirs: [googleDir],
  });
  const status = types["google.rpc.Status"].deserialize(raw);
  const info = (status.details ?? []).find((d) => d.type_url.endsWith("/google.rpc.ErrorInfo"));
  return info ? types["google.rpc.ErrorInfo"].deserialize(info.value).reason : "";
}

// A unary call as a promise, with a deadline.
export function call(client, method, request, deadlineSeconds = 10) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + deadlineSeconds * 1000);
    client[method](request, { deadline }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

export { grpc };
