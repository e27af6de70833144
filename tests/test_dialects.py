"""The vendor dialects as pure functions: request bodies built from domain inputs,
replies and error bodies parsed and checked, settings checked against each vendor's
documented limits. No I/O here; the loopback fakes test the same code end to end."""

from __future__ import annotations

import base64
import re
import sys
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from embedgate.server.config import ConfigError
from embedgate.server.domain import (
    EmbedOptions,
    Image,
    ImageInput,
    Modality,
    TextImageInput,
    TextInput,
    VideoInput,
)
from embedgate.server.providers.aggregator import Aggregator
from embedgate.server.providers.ctyun import CTyun
from embedgate.server.providers.dialect import (
    BadReply,
    Dialect,
    ErrorInReply,
    WireOptions,
    parse_data_list,
)
from embedgate.server.providers.http import HttpDriver, parse_retry_after, retryable_status
from embedgate.server.providers.openai_compatible import OpenAICompatible
from embedgate.server.providers.qianfan import Qianfan
from embedgate.server.providers.registry import DIALECTS, build_providers, parse_config
from embedgate.server.providers.rzenembed import RzenEmbed
from embedgate.server.providers.scnet import SCNet
from embedgate.server.providers.settings import SettingError
from embedgate.server.providers.vendor import VendorProvider

D = TypeVar("D", bound=Dialect)


def make(dialect: type[D], **keys: Any) -> D:
    """A dialect built from its vendor's settings, validated as the file's would be."""
    settings = dialect.settings_type.model_validate(
        {"name": "m", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "UNUSED", **keys}
    )
    return dialect(settings)


WIRE = WireOptions(dimensions=None, instruction="", request_id="rid-1", user="", normalize=True)
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8
URL = "https://images.example/cat.png"


def item(index: int, vector: Any, field: str = "embedding") -> dict[str, Any]:
    return {"index": index, "object": "embedding", field: vector}


def b64(values: list[float]) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


class TestRzenEmbed:
    dialect = make(RzenEmbed, vendor_model="RzenEmbed")

    def test_each_modality_becomes_its_own_field(self) -> None:
        """Text goes in texts, an image in images (URL as given, bytes as base64), a
        text+image pair in both (one fused vector), a video's frames in video."""
        wire = WIRE
        text = self.dialect.embed_body([TextInput("two apples")], wire)
        assert text["texts"] == ["two apples"]
        assert "images" not in text
        assert "video" not in text
        assert text["input"] == []
        assert text["model"] == "RzenEmbed"
        image = self.dialect.embed_body([ImageInput(Image(data=PNG))], wire)
        assert image["images"] == [base64.b64encode(PNG).decode()]
        pair = self.dialect.embed_body([TextImageInput("cat", Image(uri=URL))], wire)
        assert (pair["texts"], pair["images"]) == (["cat"], [URL])
        video = self.dialect.embed_body([VideoInput((Image(uri=URL), Image(data=PNG)))], wire)
        assert video["video"] == [URL, base64.b64encode(PNG).decode()]

    def test_instruction_request_id_and_size_are_sent(self) -> None:
        """The caller's instruction and request id are forwarded; without an
        instruction the document's default is sent; the size always is."""
        body = self.dialect.embed_body([TextInput("a")], WIRE)
        assert body["instruction"] == "Represent the user's input."
        assert body["request_id"] == "rid-1"
        assert body["dimensions"] == 2048
        asked = WireOptions(
            dimensions=512, instruction="Find an image:", request_id="", user="", normalize=True
        )
        body = self.dialect.embed_body([TextInput("a")], asked)
        assert (body["instruction"], body["dimensions"]) == ("Find an image:", 512)
        assert "request_id" not in body

    def test_video_frame_count_is_checked_before_sending(self) -> None:
        """RzenEmbed takes 2 to 64 frames: 1 and 65 are refused, naming the frames."""
        frames = (Image(uri=URL),)
        problems = self.dialect.check(
            [VideoInput(frames), VideoInput(frames * 2), VideoInput(frames * 65)], EmbedOptions()
        )
        assert [(p.index, p.reason, p.part) for p in problems] == [
            (0, "FRAME_COUNT_OUT_OF_RANGE", "frames"),
            (2, "FRAME_COUNT_OUT_OF_RANGE", "frames"),
        ]
        assert "65 frames" in problems[1].description

    def test_a_200_reply_with_a_non_zero_status_is_an_error(self) -> None:
        """response_status other than 0, or a message other than success, is an error
        whatever the HTTP status, carrying the vendor's code and request id."""
        payload = {"data": [], "message": "quota", "response_status": 1002, "request_id": "r9"}
        with pytest.raises(ErrorInReply) as caught:
            self.dialect.parse_embeddings(payload, 1, 4)
        assert caught.value.fault.code == "1002"
        assert caught.value.fault.request_id == "r9"
        assert caught.value.fault.message == "quota"
        ok = {
            "data": [item(0, [1.0, 0.0, 0.0, 0.0])],
            "message": "success",
            "response_status": 0,
            "request_id": "r9",
        }
        parsed = self.dialect.parse_embeddings(ok, 1, 4)
        assert parsed.vectors.shape == (1, 4)
        assert parsed.request_id == "r9"

    def test_only_the_documented_sizes_can_be_the_default(self) -> None:
        """A default size outside the six documented ones is a setting error; one request
        per input is the only batch size."""
        with pytest.raises(SettingError) as caught:
            make(RzenEmbed, vendor_model="RzenEmbed", dimensions=1000)
        assert caught.value.field == "dimensions"
        with pytest.raises(SettingError):
            make(RzenEmbed, vendor_model="RzenEmbed", max_batch=2)
        caps = make(RzenEmbed, vendor_model="RzenEmbed", dimensions=1024).capabilities
        assert caps.max_batch == 1
        assert caps.native.default == 1024
        assert caps.modalities == frozenset(Modality)


class TestReplies:
    def test_indices_put_rows_in_order(self) -> None:
        """Rows come back in index order whatever order the vendor listed them in."""
        payload = {"data": [item(2, [3.0]), item(0, [1.0]), item(1, [2.0])]}
        vectors = parse_data_list(payload, 3, 1, ("embedding",))
        assert vectors[:, 0].tolist() == [1.0, 2.0, 3.0]

    @pytest.mark.parametrize(
        ("data", "problem"),
        [
            ([item(0, [1.0, 2.0])], "1 vectors for 2 inputs"),
            ([item(0, [1.0, 2.0]), item(0, [1.0, 2.0])], "appears twice"),
            ([item(0, [1.0, 2.0]), item(2, [1.0, 2.0])], "not 0 to 1"),
            ([item(0, [1.0, 2.0]), item(1, [1.0])], "1 dimensions, expected 2"),
            ([item(0, [1.0, 2.0]), item(1, [float("nan"), 1.0])], "NaN"),
            ([item(0, [1.0, 2.0]), item(1, ["x", 1.0])], "other than numbers"),
            ([item(0, [1.0, 2.0]), item(1, "%%%")], "neither a float array nor base64"),
            ([item(0, [1.0, 2.0]), {"index": 1}], "missing or not a vector"),
        ],
    )
    def test_a_reply_that_breaks_the_dialect_is_refused(
        self, data: list[dict[str, Any]], problem: str
    ) -> None:
        """A wrong count, a repeated or out-of-range index, a wrong size, a non-finite or
        non-numeric value is an error, never data."""
        with pytest.raises(BadReply, match=problem):
            parse_data_list({"data": data}, 2, 2, ("embedding",))

    def test_ctyun_reads_embeddings_and_embedding_as_floats_or_base64(self) -> None:
        """CTyun's document names the field embeddings; OpenAI's embedding is accepted
        too; a base64 string is little-endian float32."""
        dialect = make(CTyun, vendor_model="4b38a36c", dimensions=2)
        payload = {
            "data": [item(0, b64([0.5, -1.5]), "embeddings"), item(1, [2.0, 3.0], "embedding")],
            "usage": {"prompt_tokens": 7, "total_tokens": 7},
        }
        parsed = dialect.parse_embeddings(payload, 2, 2)
        assert parsed.vectors.tolist() == [[0.5, -1.5], [2.0, 3.0]]
        assert parsed.prompt_tokens == 7

    def test_an_error_object_in_a_200_reply_is_an_error(self) -> None:
        """An OpenAI-style error object is an error even in an HTTP 200 reply."""
        dialect = make(OpenAICompatible, vendor_model="text-embedding-3-small")
        payload = {"error": {"message": "overloaded", "type": "server_error", "code": "x1"}}
        with pytest.raises(ErrorInReply) as caught:
            dialect.parse_embeddings(payload, 1, 1536)
        assert (caught.value.fault.code, caught.value.fault.message) == ("x1", "overloaded")


class TestTextVendors:
    def test_scnet_splits_by_five_and_never_sends_a_size(self) -> None:
        """SCNet takes 5 texts per request and its size cannot change: no size field is
        sent (its document spells it three ways), and a larger max_batch is refused."""
        dialect = make(SCNet, vendor_model="Qwen3-Embedding-8B")
        assert dialect.capabilities.max_batch == 5
        assert dialect.capabilities.native.default == 4096
        body = dialect.embed_body([TextInput("a")], WireOptions(4096, "", "r", "", normalize=True))
        assert not {"dimension", "dimensions"} & body.keys()
        assert body["input"] == ["a"]
        with pytest.raises(SettingError, match="at most 5"):
            make(SCNet, vendor_model="Qwen3-Embedding-8B", max_batch=6)

    @pytest.mark.parametrize(
        ("model", "batch", "chars", "size"),
        [
            ("embedding-v1", 16, 1000, 384),
            ("bge-large-zh", 16, 2000, 1024),
            ("bge-large-en", 16, 2000, 1024),
            ("tao-8k", 1, 28000, 1024),
        ],
    )
    def test_qianfan_text_models_carry_their_documented_limits(
        self, model: str, batch: int, chars: int, size: int
    ) -> None:
        """Each Qianfan text model has its own texts per request and characters per
        text, checked before sending."""
        dialect = make(Qianfan, vendor_model=model)
        assert dialect.capabilities.max_batch == batch
        assert dialect.capabilities.native.default == size
        assert dialect.capabilities.modalities == {Modality.TEXT}
        problems = dialect.check(
            [TextInput("x" * chars), TextInput("x" * (chars + 1))], EmbedOptions()
        )
        assert [(p.index, p.reason) for p in problems] == [(1, "INPUT_TOO_LONG")]
        assert f"at most {chars}" in problems[0].description

    def test_qianfan_multimodal_model_sends_objects(self) -> None:
        """gme-qwen2-vl-2b-instruct takes one {text, image} object per request."""
        dialect = make(Qianfan, vendor_model="gme-qwen2-vl-2b-instruct")
        assert dialect.capabilities.max_batch == 1
        assert Modality.TEXT_IMAGE in dialect.capabilities.modalities
        body = dialect.embed_body([TextImageInput("cat", Image(data=PNG))], WIRE)
        assert body["input"] == [{"text": "cat", "image": base64.b64encode(PNG).decode()}]

    def test_qianfan_errors_are_read_at_the_top_level(self) -> None:
        """Qianfan's document lists code, message and type at the top of the body."""
        dialect = make(Qianfan, vendor_model="embedding-v1")
        fault = dialect.parse_error({"id": "as-1", "code": 336003, "message": "bad", "type": "t"})
        assert (fault.code, fault.message, fault.request_id) == ("336003", "bad", "as-1")
        with pytest.raises(ErrorInReply):
            dialect.parse_embeddings({"code": 1, "message": "no"}, 1, 384)

    def test_openai_sends_dimensions_only_where_the_model_takes_them(self) -> None:
        """text-embedding-3 models take a size; others don't, unless configured so."""
        small = make(OpenAICompatible, vendor_model="text-embedding-3-small")
        body = small.embed_body([TextInput("a")], WireOptions(256, "", "", "u1", normalize=True))
        assert (body["dimensions"], body["user"], body["encoding_format"]) == (256, "u1", "base64")
        assert small.capabilities.dimensions.accepts(256)
        ada = make(OpenAICompatible, vendor_model="text-embedding-ada-002")
        assert "dimensions" not in ada.embed_body([TextInput("a")], WIRE)
        assert not ada.capabilities.dimensions.accepts(256)

    def test_an_unknown_model_needs_its_size_configured(self) -> None:
        """The gateway checks every reply's size, so a model whose size it cannot know
        must be given one."""
        with pytest.raises(SettingError) as caught:
            make(OpenAICompatible, vendor_model="my-embedder")
        assert caught.value.field == "dimensions"
        with pytest.raises(SettingError):
            make(CTyun, vendor_model="4b38a36c")


class TestAggregator:
    def test_embed_body_has_objects_normalized_and_type(self) -> None:
        """Inputs are {text, image} objects; the normalize option travels as normalized."""
        dialect = make(Aggregator, vendor_model="jina-clip-v2", dimensions=8)
        body = dialect.embed_body(
            [TextInput("a"), ImageInput(Image(uri=URL))],
            WireOptions(None, "", "", "", normalize=False),
        )
        assert body == {
            "model": "jina-clip-v2",
            "input": [{"text": "a"}, {"image": URL}],
            "normalized": False,
            "embedding_type": "float",
        }

    def test_rerank_replies_are_checked(self) -> None:
        """A ranking with fewer results than asked, a repeated or unknown document, or a
        non-finite score is an error; extra results beyond top_n are fine."""
        dialect = make(Aggregator, vendor_model="bge-reranker", task="rerank")
        assert dialect.capabilities.reranks
        assert not dialect.capabilities.embeds

        def results(*pairs: tuple[int, float]) -> dict[str, Any]:
            return {"results": [{"index": i, "relevance_score": s} for i, s in pairs]}

        ok = dialect.parse_ranking(results((1, 0.9), (0, 0.2), (2, 0.1)), 3, 2)
        assert [r.index for r in ok.results] == [1, 0, 2]
        with pytest.raises(BadReply, match="ranks 1 of 3"):
            dialect.parse_ranking(results((1, 0.9)), 3, 2)
        with pytest.raises(BadReply, match="twice"):
            dialect.parse_ranking(results((1, 0.9), (1, 0.8)), 3, 2)
        with pytest.raises(BadReply, match="not 0 to 2"):
            dialect.parse_ranking(results((1, 0.9), (3, 0.8)), 3, 2)
        with pytest.raises(BadReply, match="finite"):
            dialect.parse_ranking(results((1, float("inf")), (0, 0.8)), 3, 2)
        body = dialect.rerank_body("q", ["a", "b"], None)
        assert "top_n" not in body
        assert body["documents"] == ["a", "b"]


class TestHttpRules:
    def test_retry_after_as_seconds_or_date(self) -> None:
        """Retry-After is read as seconds or an HTTP date; anything else is ignored."""
        assert parse_retry_after("3") == 3.0
        assert parse_retry_after("0.5") == 0.5
        assert parse_retry_after(None) is None
        assert parse_retry_after("soon") is None
        later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
        seconds = parse_retry_after(later)
        assert seconds is not None
        assert 25 <= seconds <= 31

    def test_only_408_429_and_5xx_are_retried(self) -> None:
        """Other 4xx are the request's fault: sending it again cannot help."""
        retried = [
            code
            for code in (400, 401, 403, 404, 408, 409, 422, 429, 500, 503)
            if retryable_status(code)
        ]
        assert retried == [408, 429, 500, 503]


class TestSizes:
    def test_a_matryoshka_model_asks_for_the_next_larger_size(self) -> None:
        """A size the vendor doesn't give is served from the next larger one it does,
        cut later; a model that isn't Matryoshka-trained doesn't offer it at all."""
        plain = make(RzenEmbed, vendor_model="RzenEmbed")
        assert not plain.capabilities.dimensions.accepts(300)
        cut = make(RzenEmbed, vendor_model="RzenEmbed", matryoshka=True)
        assert cut.capabilities.dimensions.accepts(300)
        at = "http://127.0.0.1:9"
        provider = VendorProvider(cut, HttpDriver(), base_url=at)
        assert provider.sizes(300) == (512, 512)
        assert provider.sizes(None) == (2048, 2048)
        assert provider.info.dimensions.describe() == "from 1 to 2048"
        fixed = make(SCNet, vendor_model="Qwen3-Embedding-8B", matryoshka=True)
        provider = VendorProvider(fixed, HttpDriver(), base_url=at)
        assert provider.sizes(1024) == (None, 4096)


class TestKeys:
    def models(self, **key: str) -> list[dict[str, Any]]:
        return [{"name": "rzen", "provider": "rzenembed", **key}]

    def test_a_missing_key_names_the_variable_or_file(self, tmp_path: Path) -> None:
        """Start-up fails naming the variable or the file, never printing a key."""
        config = parse_config({"models": self.models(api_key_env="EMBEDGATE_TEST_UNSET_KEY")})
        with pytest.raises(ConfigError, match=r"models\[0\]\.api_key_env: .*EMBEDGATE_TEST_UNSET"):
            build_providers(config.models, driver=HttpDriver())
        missing = tmp_path / "nope"
        config = parse_config({"models": self.models(api_key_file=str(missing))})
        with pytest.raises(ConfigError, match=r"models\[0\]\.api_key_file: cannot read"):
            build_providers(config.models, driver=HttpDriver())
        empty = tmp_path / "empty"
        empty.write_text("\n")
        config = parse_config({"models": self.models(api_key_file=str(empty))})
        with pytest.raises(ConfigError, match="is empty"):
            build_providers(config.models, driver=HttpDriver())

    def test_a_key_file_is_read_without_its_newline(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A mounted secret's trailing newline is not part of the key, and the key is
        not in the settings' repr."""
        secret = tmp_path / "key"
        secret.write_text("canary-key-123\n")
        config = parse_config({"models": self.models(api_key_file=str(secret))})
        (provider,) = build_providers(config.models, driver=HttpDriver())
        assert isinstance(provider, VendorProvider)
        assert provider._keys.keys == ("canary-key-123",)
        assert "canary" not in repr(provider._settings)

    def test_vendors_that_need_a_key_say_so(self) -> None:
        """The five documented vendors need a key; a self-hosted OpenAI-compatible
        server and the relay may not."""
        for provider in ("rzenembed", "ctyun", "scnet", "qianfan"):
            with pytest.raises(ConfigError, match="api_key_env or api_key_file is required"):
                parse_config({"models": [{"name": "m", "provider": provider, "vendor_model": "x"}]})
        parse_config(
            {
                "models": [
                    {"name": "o", "provider": "openai", "vendor_model": "text-embedding-3-small"}
                ]
            }
        )


def test_each_vendor_module_names_its_source_document() -> None:
    """Every dialect's module docstring says which vendor document it follows and when
    that document was read: the quirks in it are only as good as their source."""
    for vendor, dialect in DIALECTS.items():
        module = sys.modules[dialect.__module__]
        doc = module.__doc__ or ""
        source = re.search(r"Source: (.+?), read\s+(\d{4}-\d{2}-\d{2})", doc, re.S)
        assert source is not None, vendor
