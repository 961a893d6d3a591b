"""Errors raised by the nftables layer."""


class NftError(Exception):
    """A transaction was rejected; nothing of it was applied.

    ``line`` is the 1-based line of the transaction nft complained about (when known) and
    ``text`` that line, so the message names the offending operation.
    """

    def __init__(self, message: str, line: int | None = None, text: str | None = None):
        self.message = message
        self.line = line
        self.text = text
        where = f" (line {line}: {text})" if line is not None and text is not None else ""
        super().__init__(f"{message}{where}")
