"""`generate`: a prompt to the whole response as text, or with a suffix the text that fills the
gap between them. Above both `stream_generate` and `infill`, which it uses."""

from .generation import print_stats, stream_generate
from .infilling import Gap, infill


def generate(
    model, tokenizer, prompt, verbose: bool = False, suffix=None, gap_length=None, **kwargs
) -> str:
    """The whole response as text (like `mlx_lm.generate`); `verbose` streams it and prints stats.
    With `suffix`, fills the gap between `prompt` and `suffix` instead (raw text, no chat
    template; `gap_length` tokens, default: the rest of the canvas) and returns the fill."""
    if suffix is not None:
        for k in ("apply_chat_template", "system_prompt", "enable_thinking"):
            kwargs.pop(k, None)
        result = infill(model, tokenizer, [prompt, Gap(gap_length), suffix], **kwargs)
        if verbose:
            print(result.text)
        return result.fills[0]
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(last.text, end="", flush=True)
        text += last.text
    if verbose and last is not None:
        print()
        print_stats(last)
    return text
