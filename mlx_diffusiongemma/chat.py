"""Interactive chat that keeps the prompt KV cache across turns: each turn encodes only its new
tokens. `python -m mlx_diffusiongemma.chat [--model PATH]`."""

import argparse
from typing import List, Optional

from .generation import make_prompt_cache, stream_generate


class ChatSession:
    """A conversation with its prompt cache. `send(text)` streams the reply's responses."""

    def __init__(self, model, tokenizer, system_prompt: Optional[str] = None, enable_thinking: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt, self.enable_thinking = system_prompt, enable_thinking
        self.reset()

    def reset(self):
        self.cache = make_prompt_cache(self.model)
        self.messages: List[dict] = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.history: List[int] = []  # every token the cache holds

    def new_tokens(self, text: str) -> List[int]:
        """Tokens the next user turn adds after the cached conversation: the chat template of the
        whole conversation, minus the text the cache already holds."""
        return list(self.tokenizer.encode(self.new_text(text), add_special_tokens=False))

    def new_text(self, text: str) -> str:
        tok = self.tokenizer
        messages = self.messages + [{"role": "user", "content": text}]
        full = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                       enable_thinking=self.enable_thinking)
        done = tok.decode(self.history) if self.history else ""
        if full.startswith(done):
            new = full[len(done):]
        else:  # a template that renders past replies differently: this turn's part alone
            new = tok.apply_chat_template(messages[-1:], tokenize=False, add_generation_prompt=True,
                                          enable_thinking=self.enable_thinking)
            bos = getattr(tok, "bos_token", None)
            if bos and new.startswith(bos):
                new = new[len(bos):]
        return new

    def send(self, text: str, images=None, **kwargs):
        """Streams the reply to `text`; `images` (paths, URLs, PIL images, ...) join this turn,
        placed before its text."""
        if not text.strip():
            raise ValueError("the message is empty")
        if images:
            from .image_processor import load_image
            from .multimodal import expand_text, placeholders

            if not self.model.has_vision:
                raise ValueError("this checkpoint has no vision tower (a text-only conversion): "
                                 "it cannot read images")
            images = [load_image(i) for i in images]  # read once: layout here, tower below
            # Placeholders in the turn's text: past turns render the same way, whatever the
            # template does with content parts.
            text = placeholders(self.model, self.tokenizer, len(images)) + text
            ids = expand_text(self.model, self.tokenizer, self.new_text(text), images)
        else:
            ids = self.new_tokens(text)
        reply, tokens, last = "", [], None
        for last in stream_generate(self.model, self.tokenizer, ids, prompt_cache=self.cache,
                                    images=images, **kwargs):
            reply += last.text
            tokens += last.tokens
            yield last
        self.history += ids + tokens + ([last.stop_token] if last is not None and last.stop_token is not None else [])
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


def main(argv=None):
    from .cli import add_model_argument, load_for_cli, one_line_errors
    from .image_processor import load_image

    p = argparse.ArgumentParser(prog="mlx_diffusiongemma.chat", description="Chat with DiffusionGemma.")
    add_model_argument(p)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--max-tokens", "-m", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--enable-thinking", action="store_true")
    args = p.parse_args(argv)
    with one_line_errors():
        model, tokenizer = load_for_cli(args.model, adapter_path=args.adapter_path)
        session = ChatSession(model, tokenizer, args.system_prompt, args.enable_thinking)
        print("Type a message; '/image PATH' attaches an image to the next one; 'r' resets the "
              "conversation, 'q' (or end of input) quits.")
        pending = []
        while True:
            try:
                text = input(">> ")
            except EOFError:
                break
            if text.strip() == "q":
                break
            if text.strip() == "r":
                session.reset()
                continue
            if text.startswith("/image "):
                try:  # read now: a bad path is reported here, the session goes on
                    pending.append(load_image(text[len("/image "):].strip()))
                except ValueError as e:
                    print(f"error: {e}")
                continue
            if not text.strip():
                continue
            images, pending = pending, []
            for r in session.send(text, images=images, max_tokens=args.max_tokens,
                                  max_denoising_steps=args.steps, seed=args.seed):
                print(r.text, end="", flush=True)
            print()


if __name__ == "__main__":
    main()
