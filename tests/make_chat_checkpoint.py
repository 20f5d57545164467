"""A tiny checkpoint with a Gemma 4 style tokenizer for the server's chat tests: the turn,
thought-channel and tool-call markers are special tokens, and the chat template renders tools,
assistant tool calls and tool results the way Gemma 4's does (so mlx-lm picks its Gemma 4
tool parser for it)."""

import json
from pathlib import Path

from make_checkpoints import write_checkpoint
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<|turn>",
    "<turn|>",
    "<|channel>",
    "<channel|>",
    "<|tool>",
    "<tool|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    '<|"|>',
    "<|think|>",
]
EOS = [SPECIALS.index("<eos>"), SPECIALS.index("<turn|>")]
TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools or enable_thinking %}<|turn>system\n{% if enable_thinking %}<|think|>{% endif %}"
    "{% for t in tools or [] %}<|tool>declaration:{{ t.function.name }}"
    "{{ t.function.parameters | tojson }}<tool|>{% endfor %}<turn|>\n{% endif %}"
    "{% for m in messages %}<|turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{% for c in m.tool_calls or [] %}<|tool_call>call:{{ c.function.name }}"
    "{{ c.function.arguments | tojson }}<tool_call|>{% endfor %}"
    "{% if m.role == 'tool' %}<|tool_response>response:{{ m.name }}{{ m.content }}"
    "<tool_response|>{% else %}{{ m.content or '' }}{% endif %}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n"
    "{% if enable_thinking %}<|channel>thought\n{% endif %}{% endif %}"
)
CORPUS = [
    "What is the weather in Paris? Sure, let me check. call:get_weather{city:Paris} "
    "response thought I should call the tool. The answer is 42. user model system tool "
    "0123456789 {}[]():,;.!?"
]


def write_chat_checkpoint(out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "model_max_length": 4096,
            }
        )
    )
    (out / "chat_template.jinja").write_text(TEMPLATE)
    write_checkpoint(
        out,
        seed=5,
        canvas_length=16,
        vocab_size=384,
        eos_token_id=EOS,
        pad_token_id=0,
        bos_token_id=2,
        generation=dict(max_new_tokens=128, max_denoising_steps=4, eos_token_id=EOS),
    )
    return out
