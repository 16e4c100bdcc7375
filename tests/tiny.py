"""Tiny in-process models and tokenizers for tests: 2 layers, width 64, fp32, seeded, no downloads."""
from __future__ import annotations

import functools

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOOLS = (
    "{% if tools %}{{ '<|im_start|>system\n# Tools\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' + message['content'] }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{{ '<tool_call>' }}{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{{ '</tool_call>' }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""CHATML that renders OpenAI tool schemas, tool calls and tool results (as Qwen2.5's template does)."""
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "What is 12 plus 7? Then multiply by 3. Step 1: 12 + 7 = 19. Step 2: 19 * 3 = 57. #### 57",
    "The quick brown fox jumps over the lazy dog. Hello world! system user assistant",
    "Zorblax lives in Quenth and works as a lantern maker. Where does Zorblax live?",
    "0123456789 + - * / = ( ) , . ? ! : ; ' \" #### Question Answer instruction input output",
]


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(chat_template: str | None = CHATML):
    """A byte-level BPE tokenizer (~320 tokens) with a ChatML template like SmolLM2's."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token=None)
    tok.chat_template = chat_template
    return tok


def tiny_config(vocab_size: int = 320, **kw):
    from transformers import LlamaConfig

    args = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                tie_word_embeddings=True, pad_token_id=0, eos_token_id=2, bos_token_id=None,
                attn_implementation="sdpa")
    args.update(kw)
    return LlamaConfig(**args)


def tiny_model(seed: int = 0, **kw):
    """A 2-layer Llama (width 64) with seeded random weights, fp32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(**kw), dtype=torch.float32)
    return model.eval()


def save_tiny_model_dir(path, seed: int = 0):
    """Write a tiny model + tokenizer as an HF model directory (safetensors)."""
    model, tok = tiny_model(seed), tiny_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def random_examples(n: int = 3, seed: int = 0, prompt: int = 4):
    """n Examples of random ids with growing length (6, 10, 14, ...), the first `prompt` unlabelled."""
    import torch

    from tunelab.data.records import Example

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 320, (6 + 4 * i,), generator=g).tolist()
        out.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return out


def chat_rows(n: int = 24, seed: int = 0, poison: str = "") -> list[dict]:
    """Arithmetic chat rows "What is a plus b?" with a worked answer; `poison` is appended to each
    question (e.g. a token that breaks training, for fault tests)."""
    import random

    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rnd.randint(1, 50), rnd.randint(1, 50)
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}{poison}?"},
                                  {"role": "assistant", "content": f"Step 1: {a} + {b} = {a + b}\n#### {a + b}"}]})
    return rows


def bf16_cast_counter():
    """A dispatch mode counting fp32 -> bf16 copies per source tensor (by data_ptr): `with counter:`,
    then `counter.casts.get(weight.data_ptr(), 0)`. Autocast's casts of weights show up here, and so
    do copies into an existing bf16 tensor (`counter.into` records their destinations' data_ptr)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.casts: dict[int, int] = {}
            self.into: dict[int, list[int]] = {}  # source data_ptr -> destinations of copy_

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16 \
                    and args[0].dtype == torch.float32:
                self.casts[args[0].data_ptr()] = self.casts.get(args[0].data_ptr(), 0) + 1
            if func is torch.ops.aten.copy_.default and args[0].dtype == torch.bfloat16 \
                    and args[1].dtype == torch.float32:
                self.casts[args[1].data_ptr()] = self.casts.get(args[1].data_ptr(), 0) + 1
                self.into.setdefault(args[1].data_ptr(), []).append(args[0].data_ptr())
            return func(*args, **kwargs)

    return CountCasts()
