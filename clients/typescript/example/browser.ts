// Calls embedgate from a web page with @connectrpc/connect-web, over Connect (JSON) and
// then gRPC-Web, both on fetch: every check of checks.ts but EmbedPipeline (a browser
// cannot stream a request body). The page's query names the gateway and the models:
//
//   page.html?base=http://127.0.0.1:8080&model=clip&rerank=reranker&report=/report
//
// Each line the checks write, prefixed with the transport, is shown on the page and, when
// `report` is given, POSTed there as a JSON array once both transports are done.
import { createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-web";
import { EmbeddingService } from "../src/gen/embedgate/v1/embedding_service_pb.js";
import { runChecks } from "./checks.js";

async function run(): Promise<void> {
  const query = new URLSearchParams(location.search);
  const baseUrl = query.get("base") ?? location.origin;
  const model = query.get("model") ?? "";
  const rerankModel = query.get("rerank") ?? "";
  const lines: string[] = [];
  const transports: [string, Transport][] = [
    ["connect", createConnectTransport({ baseUrl })],
    ["grpc-web", createGrpcWebTransport({ baseUrl })],
  ];
  for (const [name, transport] of transports) {
    const log = (line: string) => {
      lines.push(`${name} ${line}`);
      document.body.append(`${name} ${line}\n`);
    };
    try {
      await runChecks(createClient(EmbeddingService, transport), model, rerankModel, false, log);
    } catch (error) {
      log(`failed: ${error instanceof Error ? error.message : String(error)}`);
    }
  }
  const report = query.get("report");
  if (report) {
    await fetch(report, { method: "POST", body: JSON.stringify(lines) });
  }
}

void run();
