"""Interactive chat that keeps the prompt KV cache across turns: each turn encodes only its new
tokens. `python -m mlx_diffusiongemma.chat [--model PATH]`: Ctrl-C stops a reply and keeps the
conversation, Ctrl-D (or `q`) quits, lines are edited with readline."""

import sys
from typing import List, Optional

from .cli import (
    OneLineParser,
    add_distributed_arguments,
    add_model_argument,
    error_line,
    load_for_cli,
    rearm_interrupts,
    run_cli,
    user_errors,
)


class ChatSession:
    """A conversation with its prompt cache. `send(text)` streams the reply's responses."""

    def __init__(
        self, model, tokenizer, system_prompt: Optional[str] = None, enable_thinking: bool = False
    ):
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt, self.enable_thinking = system_prompt, enable_thinking
        self.reset()

    def reset(self):
        from .generation import make_prompt_cache

        self.cache = make_prompt_cache(self.model)
        self.messages: List[dict] = (
            [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        )
        self.history: List[int] = []  # every token the cache holds

    def new_tokens(self, text: str) -> List[int]:
        """Tokens the next user turn adds after the cached conversation: the chat template of the
        whole conversation, minus the text the cache already holds."""
        return list(self.tokenizer.encode(self.new_text(text), add_special_tokens=False))

    def new_text(self, text: str) -> str:
        tok = self.tokenizer
        messages = self.messages + [{"role": "user", "content": text}]
        full = tok.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=self.enable_thinking,
        )
        done = tok.decode(self.history) if self.history else ""
        if full.startswith(done):
            new = full[len(done) :]
        else:  # a template that renders past replies differently: this turn's part alone
            new = tok.apply_chat_template(
                messages[-1:],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=self.enable_thinking,
            )
            bos = getattr(tok, "bos_token", None)
            if bos and new.startswith(bos):
                new = new[len(bos) :]
        return new

    def send(self, text: str, images=None, **kwargs):
        """Streams the reply to `text`; `images` (paths, URLs, PIL images, ...) join this turn,
        placed before its text. A reply that does not finish (an exception, Ctrl-C, or the
        caller closing the generator) leaves the cache as it was before this turn; the turn
        stays in the conversation with the part of the reply sent so far (none sent: the turn
        is dropped), and the next turn encodes it from its text."""
        from .generation import stream_generate

        if not text.strip():
            raise ValueError("the message is empty")
        if images:
            from .image_processor import load_image
            from .multimodal import expand_text, placeholders

            if not self.model.has_vision:
                raise ValueError(
                    "this checkpoint has no vision tower (a text-only conversion): "
                    "it cannot read images"
                )
            images = [load_image(i) for i in images]  # read once: layout here, tower below
            # Placeholders in the turn's text: past turns render the same way, whatever the
            # template does with content parts.
            text = placeholders(self.model, self.tokenizer, len(images)) + text
            ids = expand_text(self.model, self.tokenizer, self.new_text(text), images)
        else:
            ids = self.new_tokens(text)
        saved = self.cache.snapshot()
        reply, tokens, last, finished = "", [], None, False
        try:
            for last in stream_generate(
                self.model, self.tokenizer, ids, prompt_cache=self.cache, images=images, **kwargs
            ):
                reply += last.text
                tokens += last.tokens
                yield last
            finished = True
        finally:
            if finished:
                stop = [last.stop_token] if last is not None and last.stop_token is not None else []
                self.history += ids + tokens + stop
            else:
                self.cache.restore(saved)
            if finished or reply:
                self.messages += [
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": reply},
                ]


def repl(args) -> int:
    try:  # line editing and history for input(), where Python has it
        import readline  # noqa: F401
    except ImportError:
        pass
    from .generation import resolve_settings
    from .image_processor import load_image
    from .sampler import check_settings

    flags = dict(max_tokens=args.max_tokens, max_denoising_steps=args.steps)
    check_settings(seed=args.seed, **flags)  # before the model loads
    model, tokenizer = load_for_cli(
        args.model, None, args.adapter_path, args.pipeline, args.pipeline_split
    )
    kw = dict(settings=resolve_settings(model, **flags), seed=args.seed)
    session = ChatSession(model, tokenizer, args.system_prompt, args.enable_thinking)
    print(
        "Type a message; '/image PATH' attaches an image to the next one; 'r' resets the "
        "conversation, 'q' or Ctrl-D quits, Ctrl-C stops a reply."
    )
    pending = []
    while True:
        try:
            text = input(">> ")
        except EOFError:
            print()  # the shell's prompt on a line of its own
            return 0
        except KeyboardInterrupt:  # drops the line being typed, as a shell does
            print()
            rearm_interrupts()
            continue
        if text.strip() == "q":
            return 0
        if text.strip() == "r":
            session.reset()
            continue
        if text.startswith("/image "):
            try:  # read now: a bad path is reported here, the session goes on
                pending.append(load_image(text[len("/image ") :].strip()))
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        if not text.strip():
            continue
        images, pending = pending, []
        replies = session.send(text, images=images, **kw)
        try:
            for r in replies:
                print(r.text, end="", flush=True)
            print()
        except KeyboardInterrupt:
            replies.close()  # the session takes its cache back to before this turn
            print("\n[reply stopped]", flush=True)
            rearm_interrupts()
        except user_errors() as e:  # this turn fails; the conversation goes on
            replies.close()
            print(f"\nerror: {error_line(e)}", file=sys.stderr, flush=True)


def main(argv=None):
    p = OneLineParser(prog="mlx_diffusiongemma.chat", description="Chat with DiffusionGemma.")
    add_model_argument(p)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--max-tokens", "-m", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--enable-thinking", action="store_true")
    add_distributed_arguments(p)
    args = p.parse_args(argv)
    return run_cli(repl, args)


if __name__ == "__main__":
    sys.exit(main())
