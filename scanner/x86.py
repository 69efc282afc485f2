"""Facts of the x86-64 encoding that several parts rely on, stated once."""

MAX_INSN = 15                 # bytes in the longest x86 instruction
MASK64 = (1 << 64) - 1
NEAR_CALL, NEAR_JMP = 2, 4    # ModRM.reg of opcode 0xFF; 3 and 5 are the far forms


def conditional_jump(code: bytes, address: int) -> tuple[int, int] | None:
    """(condition code, target) when `code` is exactly one prefix-free `jcc rel8`
    (70+cc) or `jcc rel32` (0f 80+cc) at `address`, else None: the jumps a window
    may displace (scanner.window) because the stub can re-encode them
    (patcher.relocate)."""
    if len(code) == 2 and 0x70 <= code[0] <= 0x7F:
        return code[0] & 0xF, (address + 2 + int.from_bytes(code[1:], "little", signed=True)) & MASK64
    if len(code) == 6 and code[0] == 0x0F and 0x80 <= code[1] <= 0x8F:
        return code[1] & 0xF, (address + 6 + int.from_bytes(code[2:], "little", signed=True)) & MASK64
    return None
