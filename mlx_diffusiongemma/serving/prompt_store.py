"""The prompt cache across requests: encoded prefixes kept by their tokens, least recently used
dropped first. A request reuses the longest kept prefix of its prompt and encodes the rest, so
a conversation sent again with one more turn encodes only that turn (when its earlier turns
render to the same tokens). Sliding layers keep only a window, so a kept prefix cannot be cut
shorter: a prompt that departs from an entry before its end cannot use it."""

from collections import OrderedDict
from typing import List, Optional, Tuple

from ..cache import PromptCache


class PromptStore:
    def __init__(self, max_entries: int = 8, max_bytes: Optional[int] = None):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: "OrderedDict[tuple, PromptCache]" = OrderedDict()

    def __len__(self):
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._entries.values())

    def fetch(self, tokens: List[int]) -> Tuple[Optional[PromptCache], int]:
        """(a copy of the cache of the longest kept prefix of `tokens`, its length) or (None, 0)."""
        best = None
        for key in self._entries:
            if (
                len(key) <= len(tokens)
                and (best is None or len(key) > len(best))
                and tuple(tokens[: len(key)]) == key
            ):
                best = key
        if best is None:
            return None, 0
        self._entries.move_to_end(best)
        return self._entries[best].copy(), len(best)

    def insert(self, tokens: List[int], cache: PromptCache):
        if self.max_entries <= 0:
            return
        key = tuple(tokens)
        self._entries[key] = cache.copy()
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries or (
            self.max_bytes is not None and len(self._entries) > 1 and self.nbytes > self.max_bytes
        ):
            self._entries.popitem(last=False)
