// The checks the example programs run, whatever carries the calls: ListModels, Embed
// with a text and with an image, StreamEmbed, Rerank, EmbedPipeline (where the
// transport carries a bidirectional stream), and one invalid request whose
// google.rpc.BadRequest is read. Each answer is checked; the first that is wrong
// throws. Written for Node.js and browsers alike (main.ts, browser.ts).
import type { MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import {
  EmbeddingService,
  type InputSchema,
} from "../src/gen/embedgate/v1/embedding_service_pb.js";
import { BadRequestSchema } from "../src/gen/google/rpc/error_details_pb.js";

export type Embedgate = Client<typeof EmbeddingService>;
export type Log = (line: string) => void;

// The smallest valid PNG, one transparent pixel: images go by value as their encoded file.
const PNG_1X1 = Uint8Array.from(
  ("89504e470d0a1a0a0000000d4948445200000001000000010806000000" +
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")
    .match(/../g) ?? [],
  (byte) => parseInt(byte, 16),
);
const timeoutMs = 30_000;

function check(condition: boolean, message: string): asserts condition {
  if (!condition) throw new Error(message);
}

/** Runs every check with `client`; `bidi`: the transport carries EmbedPipeline. */
export async function runChecks(
  client: Embedgate,
  model: string,
  rerankModel: string,
  bidi: boolean,
  log: Log,
): Promise<void> {
  const dims = await listModels(client, model, rerankModel, log);
  await embed(client, model, "text", { content: { case: "text", value: "two apples" } }, dims, log);
  const image = { source: { case: "data", value: PNG_1X1 } } as const;
  await embed(client, model, "image", { content: { case: "image", value: image } }, dims, log);
  await streamEmbed(client, model, dims, log);
  if (bidi) await embedPipeline(client, model, dims, log);
  await rerank(client, rerankModel, log);
  await badRequest(client, model, log);
  log("all checks passed");
}

/** Checks that both models serve what they are used for; returns the embedder's size. */
async function listModels(
  client: Embedgate,
  model: string,
  rerankModel: string,
  log: Log,
): Promise<number> {
  const { models } = await client.listModels({}, { timeoutMs });
  const embedder = models.find((m) => m.name === model);
  const reranker = models.find((m) => m.name === rerankModel);
  check(
    embedder?.embeds === true && reranker?.reranks === true,
    `want "${model}" to embed and "${rerankModel}" to rerank among ${models.length} models`,
  );
  const dims = embedder.defaultDimensions;
  const roles = `${model} embeds ${dims} dimensions, ${rerankModel} reranks`;
  log(`ListModels: ${models.length} models; ${roles}`);
  return dims;
}

/** Embeds one input and checks that its vector has the model's default size. */
async function embed(
  client: Embedgate,
  model: string,
  kind: string,
  input: MessageInitShape<typeof InputSchema>,
  dims: number,
  log: Log,
): Promise<void> {
  const { embeddings } = await client.embed({ model, inputs: [input] }, { timeoutMs });
  check(embeddings.length === 1, `Embed ${kind}: want 1 vector, got ${embeddings.length}`);
  const size = embeddings[0].values.length;
  check(size === dims, `Embed ${kind}: want ${dims} values, got ${size}`);
  log(`Embed ${kind}: 1 vector of ${dims} dimensions`);
}

/** Checks that every input comes back once, in whatever order. */
async function streamEmbed(
  client: Embedgate,
  model: string,
  dims: number,
  log: Log,
): Promise<void> {
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
  log(`StreamEmbed: ${texts.length} inputs, each once`);
}

/** Sends three requests on one EmbedPipeline stream; checks that each correlation id
 * comes back once, with its vector. */
async function embedPipeline(
  client: Embedgate,
  model: string,
  dims: number,
  log: Log,
): Promise<void> {
  const ids = ["p1", "p2", "p3"];
  async function* requests() {
    for (const correlationId of ids) {
      const inputs = [{ content: { case: "text", value: `pipeline ${correlationId}` } } as const];
      yield { correlationId, request: { model, inputs } };
    }
  }
  const seen = new Set<string>();
  for await (const reply of client.embedPipeline(requests(), { timeoutMs })) {
    if (reply.result.case === "error") {
      throw new Error(`EmbedPipeline: ${reply.correlationId} failed: ${reply.result.value.message}`);
    }
    const values = reply.result.value?.embeddings[0]?.values.length;
    check(
      ids.includes(reply.correlationId) && !seen.has(reply.correlationId) && values === dims,
      `EmbedPipeline: unexpected reply for ${reply.correlationId}`,
    );
    seen.add(reply.correlationId);
  }
  check(seen.size === ids.length, `EmbedPipeline: ${seen.size} of ${ids.length} replies came back`);
  log(`EmbedPipeline: ${ids.length} requests, each answered once`);
}

/** Checks that the results rank every document once, best first. */
async function rerank(client: Embedgate, model: string, log: Log): Promise<void> {
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
  log(`Rerank: documents in order [${order.join(" ")}], best "${documents[order[0]]}"`);
}

/** Sends an Embed with no inputs and reads the google.rpc.BadRequest that Connect
 * decodes from the grpc-status-details-bin trailer. */
async function badRequest(client: Embedgate, model: string, log: Log): Promise<void> {
  try {
    await client.embed({ model, inputs: [] }, { timeoutMs });
  } catch (caught) {
    const error = ConnectError.from(caught);
    check(
      error.code === Code.InvalidArgument,
      `invalid Embed: want INVALID_ARGUMENT, got ${error}`,
    );
    const violations = error.findDetails(BadRequestSchema).flatMap((bad) => bad.fieldViolations);
    for (const v of violations) log(`BadRequest: ${v.field} ${v.description}`);
    check(
      violations.some((v) => v.field === "inputs"),
      "invalid Embed: no BadRequest violation of field inputs",
    );
    return;
  }
  throw new Error("invalid Embed: the call succeeded");
}
