// Calls embedgate's EmbeddingService the way a Node.js service would: ListModels, Embed
// with a text and with an image, StreamEmbed, Rerank, and one invalid request whose
// google.rpc.BadRequest it reads. It checks every answer and exits non-zero on the
// first that is wrong.
//
//   node dist/example/main.js --addr 127.0.0.1:50051 --model clip --rerank-model reranker
import { parseArgs } from "node:util";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  EmbeddingService,
  type InputSchema,
} from "../src/gen/embedgate/v1/embedding_service_pb.js";
import { BadRequestSchema } from "../src/gen/google/rpc/error_details_pb.js";

type Embedgate = Client<typeof EmbeddingService>;

// The smallest valid PNG, one transparent pixel: images go by value as their encoded file.
const PNG_1X1 = Buffer.from(
  "89504e470d0a1a0a0000000d4948445200000001000000010806000000" +
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082",
  "hex",
);
const timeoutMs = 30_000;

function check(condition: boolean, message: string): asserts condition {
  if (!condition) throw new Error(message);
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      addr: { type: "string", default: "127.0.0.1:50051" },
      model: { type: "string" },
      "rerank-model": { type: "string" },
    },
  });
  const { addr, model, "rerank-model": rerankModel } = values;
  if (!model || !rerankModel) {
    throw new Error("usage: main.js --addr HOST:PORT --model NAME --rerank-model NAME");
  }
  // gRPC on plaintext HTTP/2. Connect reads messages of up to 4 GiB, so the gateway's
  // responses of up to 16 MiB need no setting.
  const transport = createGrpcTransport({ baseUrl: `http://${addr}` });
  const client = createClient(EmbeddingService, transport);

  const dims = await listModels(client, model, rerankModel);
  await embed(client, model, "text", { content: { case: "text", value: "two apples" } }, dims);
  const image = { source: { case: "data", value: PNG_1X1 } } as const;
  await embed(client, model, "image", { content: { case: "image", value: image } }, dims);
  await streamEmbed(client, model, dims);
  await rerank(client, rerankModel);
  await badRequest(client, model);
  console.log("all checks passed");
}

/** Checks that both models serve what they are used for; returns the embedder's size. */
async function listModels(client: Embedgate, model: string, rerankModel: string): Promise<number> {
  const { models } = await client.listModels({}, { timeoutMs });
  const embedder = models.find((m) => m.name === model);
  const reranker = models.find((m) => m.name === rerankModel);
  check(
    embedder?.embeds === true && reranker?.reranks === true,
    `want "${model}" to embed and "${rerankModel}" to rerank among ${models.length} models`,
  );
  const dims = embedder.defaultDimensions;
  const roles = `${model} embeds ${dims} dimensions, ${rerankModel} reranks`;
  console.log(`ListModels: ${models.length} models; ${roles}`);
  return dims;
}

/** Embeds one input and checks that its vector has the model's default size. */
async function embed(
  client: Embedgate,
  model: string,
  kind: string,
  input: MessageInitShape<typeof InputSchema>,
  dims: number,
): Promise<void> {
  const { embeddings } = await client.embed({ model, inputs: [input] }, { timeoutMs });
  check(embeddings.length === 1, `Embed ${kind}: want 1 vector, got ${embeddings.length}`);
  const size = embeddings[0].values.length;
  check(size === dims, `Embed ${kind}: want ${dims} values, got ${size}`);
  console.log(`Embed ${kind}: 1 vector of ${dims} dimensions`);
}

/** Checks that every input comes back once, in whatever order. */
async function streamEmbed(client: Embedgate, model: string, dims: number): Promise<void> {
  const texts = ["a", "b", "c"];
  const inputs = texts.map((value) => ({ content: { case: "text", value } }) as const);
  const seen = new Set<number>();
  for await (const item of client.streamEmbed({ request: { model, inputs } }, { timeoutMs })) {
    // A failed input carries its own google.rpc.Status; the stream goes on.
    if (item.result.case === "error") {
      throw new Error(`StreamEmbed: input ${item.index} failed: ${item.result.value.message}`);
    }
    check(
      item.index < texts.length &&
        !seen.has(item.index) &&
        item.result.value?.values.length === dims,
      `StreamEmbed: unexpected message for input ${item.index}`,
    );
    seen.add(item.index);
  }
  check(
    seen.size === texts.length,
    `StreamEmbed: ${seen.size} of ${texts.length} inputs came back`,
  );
  console.log(`StreamEmbed: ${texts.length} inputs, each once`);
}

/** Checks that the results rank every document once, best first. */
async function rerank(client: Embedgate, model: string): Promise<void> {
  const documents = ["stock report", "a pair of apples", "weather forecast"];
  const { results } = await client.rerank({ model, query: "two apples", documents }, { timeoutMs });
  const order = results.map((r) => r.index);
  check(
    [...order].sort((a, b) => a - b).join() === documents.map((_, i) => i).join(),
    `Rerank: results name documents [${order}]`,
  );
  check(
    results.every((r, n) => n === 0 || r.relevanceScore <= results[n - 1].relevanceScore),
    "Rerank: results are not best first",
  );
  console.log(`Rerank: documents in order [${order.join(" ")}], best "${documents[order[0]]}"`);
}

/** Sends an Embed with no inputs and reads the google.rpc.BadRequest that Connect
 * decodes from the grpc-status-details-bin trailer. */
async function badRequest(client: Embedgate, model: string): Promise<void> {
  try {
    await client.embed({ model, inputs: [] }, { timeoutMs });
  } catch (caught) {
    const error = ConnectError.from(caught);
    check(
      error.code === Code.InvalidArgument,
      `invalid Embed: want INVALID_ARGUMENT, got ${error}`,
    );
    const violations = error.findDetails(BadRequestSchema).flatMap((bad) => bad.fieldViolations);
    for (const v of violations) console.log(`BadRequest: ${v.field} ${v.description}`);
    check(
      violations.some((v) => v.field === "inputs"),
      "invalid Embed: no BadRequest violation of field inputs",
    );
    return;
  }
  throw new Error("invalid Embed: the call succeeded");
}

main().catch((error: unknown) => {
  console.error(error instanceof Error ? error.message : error);
  process.exitCode = 1;
});
