"""A progress bar with loss, tokens/s and ETA (tqdm), or silence."""
from __future__ import annotations


class Progress:
    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        self.tokens, self.seconds = 0, 0.0

    def update(self, *, loss: float, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self.tokens / max(self.seconds, 1e-9):.0f}",
                                 refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
