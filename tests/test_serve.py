"""``longrope-triton serve`` end to end: transformers' OpenAI-compatible server on 127.0.0.1 with a
tiny local longrope Llama and a tokenizer built here (word-level, with a chat template; no hub).

A short (under original_max_position_embeddings) and a long chat are sent at the same time with a
plain HTTP client; each answer must equal the same chat run alone through the patched generate().
A request whose prompt plus max_tokens exceeds max_position_embeddings is refused. The test starts
the server in its own process group and stops it itself. The server runs the PyTorch path (the
Triton interpreter would make it minutes slow); the paged cache is sized small (a CPU server
otherwise zero-fills 60 % of the machine's memory for it).

Needs the serving packages (pip install 'longrope_triton[serve]'); skipped without them.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

transformers = pytest.importorskip("transformers")
for _package in ("fastapi", "uvicorn", "openai"):
    pytest.importorskip(_package, reason="the serve end-to-end test needs pip install 'longrope_triton[serve]'")

from longrope_triton import patch_model, unpatch_model  # noqa: E402

ORIG, MAX_POS, NEW = 64, 2048, 8
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SHORT = " ".join(f"w{(7 * i) % 90}" for i in range(10))  # ~15 tokens with the template
LONG = " ".join(f"w{(11 * i) % 90}" for i in range(90))  # ~95 tokens: the long factors
STARTUP_TIMEOUT = 180
OWN_ERRORS_ARE_400 = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 25)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer longrope Llama (original_max 64; max_position_embeddings 2048, room for the
    server's default of 1024 new tokens) and its word-level tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-longrope-llama")
    vocab = {token: i for i, token in enumerate(SPECIALS + [f"w{i}" for i in range(100 - len(SPECIALS))])}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>", chat_template=CHAT_TEMPLATE).save_pretrained(path)
    torch.manual_seed(0)
    rope = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 8,
                long_factor=[1.0 + 3 * i for i in range(8)], original_max_position_embeddings=ORIG)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=MAX_POS, rope_parameters=rope,
                         bos_token_id=None, eos_token_id=None, pad_token_id=1, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights: the regimes then pick different tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.generation_config = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=None, pad_token_id=1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def references(model_dir):
    """name -> (answer, prompt tokens) of each chat run alone through the patched generate(), greedy;
    and "short, long factors": the short chat under the long factors (what stock batching beside a
    long chat computes), which must differ for the test to tell the regimes apart."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def answer(text):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), ids.shape[1]

    patch_model(model, regime="long")
    forced_long = answer(SHORT)
    unpatch_model(model)
    patch_model(model)
    return {"short": answer(SHORT), "long": answer(LONG), "short, long factors": forced_long}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat(base, model, text, max_tokens=NEW):
    """POST /v1/chat/completions: (HTTP status, parsed body, or the error's text)."""
    body = json.dumps({"model": str(model), "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    request = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def server(model_dir, tmp_path, request):
    """``longrope-triton serve`` on a free 127.0.0.1 port (options: the test's parameter); yields its
    base URL and log path; stopped (its whole process group) at the end."""
    port, log_path = free_port(), tmp_path / "serve.log"
    command = [sys.executable, "-m", "longrope_triton.cli", "serve", str(model_dir), "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--cb-num-blocks", "64", "--cb-max-batch-tokens", "256",
               "--cb-block-size", "16", *request.param]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRITON_INTERPRET="0",
               TOKENIZERS_PARALLELISM="false")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        start = time.time()
        while not _healthy(base):
            if process.poll() is not None or time.time() - start > STARTUP_TIMEOUT:
                pytest.fail(f"the server did not come up (exit {process.poll()}):\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, log_path
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _logged(log_path, text, timeout=10) -> bool:
    """Whether the server's log shows ``text`` within ``timeout`` seconds (it logs after answering)."""
    start = time.time()
    while text not in log_path.read_text():
        if time.time() - start > timeout:
            return False
        time.sleep(0.2)
    return True


def _healthy(base) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.parametrize("server", [pytest.param(["--continuous-batching"], id="continuous-batching"),
                                    pytest.param([], id="one-at-a-time")], indirect=True)
def test_serve_answers_concurrent_short_and_long_chats(server, model_dir, references):
    base, log_path = server
    assert references["short"][1] < ORIG < references["long"][1]  # one chat per regime
    assert references["short, long factors"][0] != references["short"][0]

    answers = {}

    def ask(name, text):
        answers[name] = chat(base, model_dir, text)

    threads = [threading.Thread(target=ask, args=item) for item in (("short", SHORT), ("long", LONG))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log = log_path.read_text()
    assert "patched" in log, f"the server's model was not patched:\n{log[-3000:]}"
    for name, (status, body) in answers.items():
        assert status == 200, f"{name}: HTTP {status} {body}\n{log[-3000:]}"
        assert body["choices"][0]["message"]["content"] == references[name][0], name
        assert body["usage"]["prompt_tokens"] == references[name][1], name

    status, body = chat(base, model_dir, LONG, max_tokens=MAX_POS)  # prompt + max_tokens > max_position_embeddings
    refusal = "exceed max_position_embeddings (2048)"
    if OWN_ERRORS_ARE_400:
        assert status == 400 and refusal in body, (status, body)
    else:  # transformers 5.5-5.17 answer a request's ValueError with 500, and log it
        assert status == 500 and _logged(log_path, refusal), (status, body, log_path.read_text()[-3000:])
    status, body = chat(base, model_dir, SHORT)  # and the server goes on serving
    assert status == 200 and body["choices"][0]["message"]["content"] == references["short"][0]
