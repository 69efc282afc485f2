"""Facts of the x86-64 encoding that several parts rely on, stated once."""

MAX_INSN = 15                 # bytes in the longest x86 instruction
MASK64 = (1 << 64) - 1
NEAR_CALL, NEAR_JMP = 2, 4    # ModRM.reg of opcode 0xFF; 3 and 5 are the far forms
