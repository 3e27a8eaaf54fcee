"""What a `torch.save` pickle may contain, checked on its opcodes before any is executed.

`pickle.Unpickler` trusts its input beyond the names it imports: a memo index allocates a
table that size (`LONG_BINPUT 0x7ffffff0`: 16 GiB from a 364-byte file), NEWOBJ / INST / OBJ
/ EXT construct objects without a REDUCE, and sets, bytearrays and out-of-band buffers are
nothing torch writes. `check_opcodes` walks the opcode stream (`pickletools.genops`, no
object is built) and refuses, in one line, any opcode outside what torch.save's pickles use
(protocols 2 to 4), a memo index that is not the next one or an earlier one, containers
nested deeper than MAX_NESTING, and more opcodes than a state dict needs. The unpickler then
holds at most one memo slot and one new object per opcode.

The nesting is followed on a stack of heights, as the unpickler's stack would hold the
objects; a list filled after it was stored in the memo and put into another escapes it (its
height here is the one it had when stored), so the reader checks nesting and cycles again
on the built objects (torch_pickle.plain).
"""

from __future__ import annotations

import pickletools

from lpt_jax.errors import CheckpointError, UnsafeCheckpointError

# Everything torch.save writes (protocol 2 by default, 4 with pickle_protocol=4): containers,
# numbers, strings, the memo, names (GLOBAL) and calls of them (REDUCE), BUILD (an
# OrderedDict's `_metadata`), persistent ids (BINPERSID, the storages).
ALLOWED = frozenset("""
    PROTO FRAME STOP MARK POP POP_MARK DUP
    NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT
    UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 BINBYTES SHORT_BINBYTES BINBYTES8
    EMPTY_DICT EMPTY_LIST EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 LIST DICT
    APPEND APPENDS SETITEM SETITEMS
    PUT BINPUT LONG_BINPUT MEMOIZE GET BINGET LONG_BINGET
    GLOBAL STACK_GLOBAL REDUCE BUILD BINPERSID
""".split())
# Opcodes that construct or look up objects other than through the allow-listed names.
CONSTRUCTING = frozenset({"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4",
                          "PERSID"})
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_FILLS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS"})  # into the container below
_MAKES = frozenset({"EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2",
                    "TUPLE3", "LIST", "DICT"})
MAX_NESTING = 100  # a state dict nests a handful of levels
# ~33 opcodes per tensor (the fixtures: 1,500 for 46 tensors): room for ~7,500 tensors, and
# at most ~30 MiB of objects whatever the pickle (one per opcode; 27 MiB measured).
MAX_OPCODES = 250_000


def check_opcodes(data: bytes, path: str, name: str) -> None:
    """Refuses the pickle `data` (the record `name` of `path`) unless every opcode is one
    torch.save writes, every memo index is in range and no container on the stack nests
    deeper than MAX_NESTING; nothing of it is executed."""
    heights = _Heights()
    for count, (op, arg, pos) in enumerate(_decoded(data, path, name)):
        if op.name not in ALLOWED:
            what = ("which constructs objects without the allowed names"
                    if op.name in CONSTRUCTING else "which torch.save never writes")
            error = UnsafeCheckpointError if op.name in CONSTRUCTING else CheckpointError
            raise error(f"{path}: refused without running it: {name} uses the pickle opcode "
                        f"{op.name} at byte {pos}, {what}")
        memo = len(heights.memo)  # the memo holds exactly the indices 0 .. memo - 1
        if op.name in _PUTS and arg > memo:
            raise CheckpointError(f"{path}: refused: {name} stores memo index {arg} at byte "
                                  f"{pos}, but has memoized {memo} objects")
        if op.name in _GETS and not 0 <= arg < memo:
            raise CheckpointError(f"{path}: refused: {name} reads memo index {arg} at byte "
                                  f"{pos}, but has memoized {memo} objects")
        try:
            height = heights.step(op, arg)
        except IndexError:
            raise CheckpointError(f"{path}: {name} is not a pickle (stack underflow at byte "
                                  f"{pos})") from None
        if height > MAX_NESTING:
            raise CheckpointError(f"{path}: refused: {name} nests containers deeper than "
                                  f"{MAX_NESTING} levels (at byte {pos})")
        if count >= MAX_OPCODES:
            raise CheckpointError(f"{path}: refused: {name} has more than {MAX_OPCODES} pickle "
                                  "opcodes, far more than a state dict needs")


class _Heights:
    """The unpickler's stack, memo and marks with each object's nesting height in place of
    the object (0: not a container); an IndexError is a stack underflow."""

    def __init__(self):
        self.stack: list[int] = []
        self.marks: list[int] = []  # where each open MARK is on the stack
        self.memo: list[int] = []

    def step(self, op, arg) -> int:
        """Follows `op`; the greatest height it left on the stack."""
        if op.name == "MARK":
            self.marks.append(len(self.stack))
            return 0
        fence = self.marks[-1] if self.marks else 0
        if op.name == "POP" and len(self.stack) == fence:  # POP at a mark drops the mark
            self.marks.pop()
            return 0
        if op.name in _PUTS or op.name == "MEMOIZE":
            if len(self.stack) == fence:
                raise IndexError
            index = len(self.memo) if op.name == "MEMOIZE" else arg
            self.memo[index:index + 1] = [self.stack[-1]]  # index <= len(memo): checked
            return 0
        before, items = list(op.stack_before), []
        if pickletools.markobject in before:
            m = self.marks.pop()
            items, self.stack[m:] = self.stack[m:], []
            before = before[:before.index(pickletools.markobject)]
            fence = self.marks[-1] if self.marks else 0
        if len(self.stack) - fence < len(before):
            raise IndexError
        inputs = self.stack[len(self.stack) - len(before):] + items
        del self.stack[len(self.stack) - len(before):]
        if op.name in _FILLS:
            out = [max(inputs[0], max(inputs[1:], default=-1) + 1)]
        elif op.name in _MAKES:
            out = [max(inputs, default=0) + 1]
        elif op.name == "DUP":
            out = inputs * 2
        elif op.name in _GETS:
            out = [self.memo[arg]]
        elif op.name == "REDUCE":  # (callable, args): what it returns holds at most the args
            out = [inputs[1]]
        elif op.name == "BUILD":  # the state is dropped or refused (torch_pickle)
            out = [inputs[0]]
        else:
            out = [0] * len(op.stack_after)
        self.stack += out
        return max(out, default=0)


def _decoded(data: bytes, path: str, name: str):
    """pickletools.genops(data), its ValueError (an unknown opcode, a truncated argument,
    bad digits) as one line."""
    ops = pickletools.genops(data)
    while True:
        try:
            yield next(ops)
        except StopIteration:
            return
        except ValueError as e:
            text = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise CheckpointError(f"{path}: {name} is not a pickle ({text})") from None
