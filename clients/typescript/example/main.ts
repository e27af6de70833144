// Calls embedgate's EmbeddingService the way a Node.js service would, over the transport
// chosen: gRPC (the gRPC port), or Connect or gRPC-Web (the HTTP port, server.http_port).
// It runs every check of checks.ts and exits non-zero on the first answer that is wrong.
//
//   node dist/example/main.js --addr 127.0.0.1:50051 --model clip --rerank-model reranker
//   node dist/example/main.js --transport connect --addr 127.0.0.1:8080 --model clip ...
import { parseArgs } from "node:util";
import { createClient, type Transport } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { EmbeddingService } from "../src/gen/embedgate/v1/embedding_service_pb.js";
import { runChecks } from "./checks.js";

const TRANSPORTS = ["grpc", "connect", "connect-h2", "grpc-web"] as const;
type TransportName = (typeof TRANSPORTS)[number];

/** The transport by its name. gRPC needs HTTP/2; Connect and gRPC-Web go over HTTP/1.1,
 * as from a browser, except "connect-h2" (Connect's binary format over h2c). Connect
 * reads messages of up to 4 GiB, so the gateway's responses of up to 16 MiB need no
 * setting. */
function transportOf(name: TransportName, baseUrl: string): Transport {
  switch (name) {
    case "grpc":
      return createGrpcTransport({ baseUrl });
    case "connect":
      return createConnectTransport({ baseUrl, httpVersion: "1.1" });
    case "connect-h2":
      return createConnectTransport({ baseUrl, httpVersion: "2", useBinaryFormat: true });
    case "grpc-web":
      return createGrpcWebTransport({ baseUrl, httpVersion: "1.1" });
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      addr: { type: "string", default: "127.0.0.1:50051" },
      transport: { type: "string", default: "grpc" },
      model: { type: "string" },
      "rerank-model": { type: "string" },
    },
  });
  const { addr, transport, model, "rerank-model": rerankModel } = values;
  if (!model || !rerankModel || !TRANSPORTS.includes(transport as TransportName)) {
    throw new Error(
      `usage: main.js --addr HOST:PORT [--transport ${TRANSPORTS.join("|")}] ` +
        "--model NAME --rerank-model NAME",
    );
  }
  const name = transport as TransportName;
  const client = createClient(EmbeddingService, transportOf(name, `http://${addr}`));
  // EmbedPipeline streams both ways: it needs HTTP/2.
  const bidi = name === "grpc" || name === "connect-h2";
  await runChecks(client, model, rerankModel, bidi, (line) => console.log(line));
}

main().catch((error: unknown) => {
  console.error(error instanceof Error ? error.message : error);
  process.exitCode = 1;
});
