// Command example calls embedgate's EmbeddingService the way a Go service would:
// ListModels, Embed with a text and with an image, StreamEmbed, Rerank, and one
// invalid request whose google.rpc.BadRequest it reads. It checks every answer and
// exits non-zero on the first that is wrong.
//
//	example -addr 127.0.0.1:50051 -model clip -rerank-model reranker
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	embedgatev1 "github.com/embedgate/embedgate/clients/go/embedgate/v1"
)

// png1x1 is the smallest valid PNG, one transparent pixel: images go by value as
// their encoded file.
var png1x1 = []byte{
	0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
	0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
	0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x60, 0x00, 0x00, 0x02,
	0x00, 0x01, 0x54, 0xa2, 0x4f, 0x5d, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42,
	0x60, 0x82,
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "the gateway, host:port")
	model := flag.String("model", "", "a model that embeds texts and images")
	rerankModel := flag.String("rerank-model", "", "a model that reranks")
	flag.Parse()
	log.SetFlags(0)
	if *model == "" || *rerankModel == "" {
		log.Fatal("usage: example -addr HOST:PORT -model NAME -rerank-model NAME")
	}
	if err := run(*addr, *model, *rerankModel); err != nil {
		log.Fatal(err)
	}
	fmt.Println("all checks passed")
}

func run(addr, model, rerankModel string) error {
	// Responses reach 16 MiB (512 vectors of 4096 floats); grpc-go takes 4 MiB unless
	// told. grpc.WithInsecure is the plaintext option of grpc-go 1.33; newer
	// versions spell it grpc.WithTransportCredentials(insecure.NewCredentials()).
	conn, err := grpc.Dial(addr, grpc.WithInsecure(),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20)))
	if err != nil {
		return fmt.Errorf("dial %s: %w", addr, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	g := &gateway{
		client:      embedgatev1.NewEmbeddingServiceClient(conn),
		model:       model,
		rerankModel: rerankModel,
	}
	if err := g.listModels(ctx); err != nil {
		return fmt.Errorf("ListModels: %w", err)
	}
	text := &embedgatev1.Input{Content: &embedgatev1.Input_Text{Text: "two apples"}}
	if err := g.embed(ctx, "text", text); err != nil {
		return fmt.Errorf("Embed text: %w", err)
	}
	image := &embedgatev1.Input{Content: &embedgatev1.Input_Image{Image: &embedgatev1.Image{
		Source: &embedgatev1.Image_Data{Data: png1x1},
	}}}
	if err := g.embed(ctx, "image", image); err != nil {
		return fmt.Errorf("Embed image: %w", err)
	}
	if err := g.streamEmbed(ctx); err != nil {
		return fmt.Errorf("StreamEmbed: %w", err)
	}
	if err := g.rerank(ctx); err != nil {
		return fmt.Errorf("Rerank: %w", err)
	}
	if err := g.badRequest(ctx); err != nil {
		return fmt.Errorf("invalid Embed: %w", err)
	}
	return nil
}

// gateway holds the client and what the calls are checked against.
type gateway struct {
	client      embedgatev1.EmbeddingServiceClient
	model       string // embeds texts and images
	rerankModel string
	dims        int // model's default vector size, from ListModels
}

// listModels checks that both models are served for what they are used for, and
// notes the embedding model's default vector size.
func (g *gateway) listModels(ctx context.Context) error {
	resp, err := g.client.ListModels(ctx, &embedgatev1.ListModelsRequest{})
	if err != nil {
		return err
	}
	models := map[string]*embedgatev1.ModelInfo{}
	for _, m := range resp.GetModels() {
		models[m.GetName()] = m
	}
	embedder, reranker := models[g.model], models[g.rerankModel]
	if !embedder.GetEmbeds() || !reranker.GetReranks() {
		return fmt.Errorf("want %q to embed and %q to rerank among %d models",
			g.model, g.rerankModel, len(models))
	}
	g.dims = int(embedder.GetDefaultDimensions())
	fmt.Printf("ListModels: %d models; %s embeds %d dimensions, %s reranks\n",
		len(models), g.model, g.dims, g.rerankModel)
	return nil
}

// embed embeds one input and checks that its vector has the model's default size.
func (g *gateway) embed(ctx context.Context, kind string, input *embedgatev1.Input) error {
	resp, err := g.client.Embed(ctx, &embedgatev1.EmbedRequest{
		Model:  g.model,
		Inputs: []*embedgatev1.Input{input},
	})
	if err != nil {
		return err
	}
	embeddings := resp.GetEmbeddings()
	if len(embeddings) != 1 {
		return fmt.Errorf("want 1 vector, got %d", len(embeddings))
	}
	if n := len(embeddings[0].GetValues()); n != g.dims {
		return fmt.Errorf("want %d values, got %d", g.dims, n)
	}
	fmt.Printf("Embed %s: 1 vector of %d dimensions\n", kind, g.dims)
	return nil
}

// streamEmbed checks that every input comes back once, in whatever order.
func (g *gateway) streamEmbed(ctx context.Context) error {
	texts := []string{"a", "b", "c"}
	request := &embedgatev1.EmbedRequest{Model: g.model}
	for _, text := range texts {
		request.Inputs = append(request.Inputs,
			&embedgatev1.Input{Content: &embedgatev1.Input_Text{Text: text}})
	}
	stream, err := g.client.StreamEmbed(ctx, &embedgatev1.StreamEmbedRequest{Request: request})
	if err != nil {
		return err
	}
	seen := make([]bool, len(texts))
	for {
		item, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		i := item.GetIndex()
		// A failed input carries its own google.rpc.Status; the stream goes on.
		if item.GetError() != nil {
			return fmt.Errorf("input %d failed: %s", i, item.GetError().GetMessage())
		}
		if int(i) >= len(texts) || seen[i] || len(item.GetEmbedding().GetValues()) != g.dims {
			return fmt.Errorf("unexpected message for input %d", i)
		}
		seen[i] = true
	}
	for i, ok := range seen {
		if !ok {
			return fmt.Errorf("no message for input %d", i)
		}
	}
	fmt.Printf("StreamEmbed: %d inputs, each once\n", len(texts))
	return nil
}

// rerank checks that the results rank every document once, best first.
func (g *gateway) rerank(ctx context.Context) error {
	documents := []string{"stock report", "a pair of apples", "weather forecast"}
	resp, err := g.client.Rerank(ctx, &embedgatev1.RerankRequest{
		Model:     g.rerankModel,
		Query:     "two apples",
		Documents: documents,
	})
	if err != nil {
		return err
	}
	results := resp.GetResults()
	if len(results) != len(documents) {
		return fmt.Errorf("want %d results, got %d", len(documents), len(results))
	}
	seen := make([]bool, len(documents))
	order := make([]uint32, len(results))
	for n, r := range results {
		i := r.GetIndex()
		if int(i) >= len(documents) || seen[i] {
			return fmt.Errorf("result %d names document %d", n, i)
		}
		if n > 0 && r.GetRelevanceScore() > results[n-1].GetRelevanceScore() {
			return fmt.Errorf("result %d scores higher than the one before", n)
		}
		seen[i] = true
		order[n] = i
	}
	fmt.Printf("Rerank: documents in order %v, best %q\n", order, documents[order[0]])
	return nil
}

// badRequest sends an Embed with no inputs and reads the google.rpc.BadRequest that
// grpc-go decodes from the grpc-status-details-bin trailer.
func (g *gateway) badRequest(ctx context.Context) error {
	_, err := g.client.Embed(ctx, &embedgatev1.EmbedRequest{Model: g.model})
	st := status.Convert(err)
	if st.Code() != codes.InvalidArgument {
		return fmt.Errorf("want INVALID_ARGUMENT, got %v", err)
	}
	for _, detail := range st.Details() {
		bad, ok := detail.(*errdetails.BadRequest)
		if !ok {
			continue
		}
		for _, v := range bad.GetFieldViolations() {
			fmt.Printf("BadRequest: %s %s\n", v.GetField(), v.GetDescription())
			if v.GetField() == "inputs" {
				return nil
			}
		}
	}
	return fmt.Errorf("no BadRequest violation of field inputs in %v", st.Details())
}
