// The module path of the generated package. This repository builds it in GOPATH mode
// (see README.md); with a module proxy, `go mod tidy` adds grpc, protobuf and genproto.
module github.com/embedgate/embedgate/clients/go

go 1.19
