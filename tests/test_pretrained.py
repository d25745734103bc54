"""pretrained=True: the real download code (torch.hub's cache) against a local HTTP server on 127.0.0.1, a truncated
download fetched again, a wrong file reported, and the offline error that says how to pass a local file."""
import http.server
import inspect
import io
import socket
import threading

import pytest
import torch

import cct_kernels
from cct_kernels.models import pretrained
from cct_kernels.models.factories import MODELS

NAME = "cct_2_3x2_32"  # small and fast; the fixture gives it a table entry like the official ones


class Server:
    """Serves `responses` (bytes, one per request, the last repeated) at /<file name>; counts the requests."""

    def __init__(self, responses):
        self.responses, self.requests = list(responses), 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = server.responses[min(server.requests, len(server.responses) - 1)]
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name):
        return f"http://127.0.0.1:{self.httpd.server_port}/{name}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def saved(model) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch.hub's cache in a temporary TORCH_HOME; returns a function pointing NAME's URL at a server."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def point_at(url):
        monkeypatch.setitem(pretrained.CHECKPOINTS, NAME, pretrained.Checkpoint(url, "test", 10))
    return point_at


def assert_same_weights(model, reference):
    expected = reference.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_downloads_once_into_the_hub_cache_and_loads(hub):
    torch.manual_seed(1)
    official = cct_kernels.create_model(NAME)
    with Server([saved(official)]) as server:
        hub(server.url("cct_2_3x2_32_test.pth"))
        model = cct_kernels.create_model(NAME, pretrained=True)
        assert_same_weights(model, official)
        assert pretrained.cached_path(NAME).is_file()
        assert str(pretrained.cached_path(NAME)).startswith(torch.hub.get_dir())
        again = MODELS[NAME](pretrained=True)  # the factory itself, from the cache
        assert_same_weights(again, official)
        assert server.requests == 1


def test_a_truncated_download_is_reported_deleted_and_fetched_again(hub, capsys):
    torch.manual_seed(2)
    official = cct_kernels.create_model(NAME)
    full = saved(official)
    with Server([full[: len(full) // 2], full]) as server:
        hub(server.url("weights.pth"))
        model = cct_kernels.create_model(NAME, pretrained=True)
        assert server.requests == 2
    assert_same_weights(model, official)
    assert "does not load" in capsys.readouterr().err


def test_a_file_that_does_not_fit_twice_is_an_error_naming_the_url(hub):
    other = cct_kernels.create_model("cct_4_3x2_32")  # another architecture's state_dict
    with Server([saved(other)]) as server:
        url = server.url("weights.pth")
        hub(url)
        with pytest.raises(RuntimeError, match="does not fit cct_2_3x2_32 twice") as error:
            cct_kernels.create_model(NAME, pretrained=True)
        assert server.requests == 2
    assert url in str(error.value)
    assert not pretrained.cached_path(NAME).exists()


def test_offline_error_names_the_url_and_how_to_pass_a_local_file(hub):
    with socket.socket() as s:  # a port nobody listens on: connection refused, as without network
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cct_2_3x2_32_test.pth"
    hub(url)
    with pytest.raises(RuntimeError) as error:
        cct_kernels.cct_2_3x2_32(pretrained=True)
    message = str(error.value)
    assert url in message and "pretrained='path/to/cct_2_3x2_32_test.pth'" in message
    assert "load_checkpoint" in message


def test_a_local_file_is_the_offline_alternative(tmp_path):
    torch.manual_seed(3)
    official = cct_kernels.create_model(NAME)
    path = tmp_path / "cct_2_3x2_32_test.pth"
    path.write_bytes(saved(official))
    assert_same_weights(cct_kernels.create_model(NAME, pretrained=str(path)), official)


def test_another_num_classes_keeps_the_body_and_gets_a_fresh_head(hub):
    torch.manual_seed(4)
    official = cct_kernels.create_model(NAME)
    with Server([saved(official)]) as server:
        hub(server.url("weights.pth"))
        model = cct_kernels.create_model(NAME, pretrained=True, num_classes=5)
    assert model.classifier.fc.weight.shape[0] == 5
    reference = official.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("classifier.fc."):
            assert torch.equal(value, reference[key]), key


def test_the_checkpoint_table_matches_the_official_one():
    assert set(pretrained.CHECKPOINTS) == {
        "cct_7_3x1_32", "cct_7_3x1_32_sine", "cct_7_3x1_32_c100", "cct_7_3x1_32_sine_c100", "cct_7_7x2_224_sine",
        "cct_14_7x2_224", "cct_14_7x2_384", "cct_14_7x2_384_fl"}
    for name, checkpoint in pretrained.CHECKPOINTS.items():
        assert name in MODELS, name
        default_classes = inspect.signature(MODELS[name]).parameters["num_classes"].default
        assert default_classes == checkpoint.num_classes, name
        assert checkpoint.url.startswith("http://ix.cs.uoregon.edu/~alih/compact-transformers/checkpoints/")


def test_a_model_without_weights_is_refused_before_any_download():
    with pytest.raises(ValueError, match="cct_4_3x2_32 has no official pretrained weights; models with weights"):
        cct_kernels.create_model("cct_4_3x2_32", pretrained=True)
