/*
 * branches -- indirect control flow.
 *
 * Exercises every common kind of indirect branch a virtualizer must follow:
 *   1. a dense 12-case `switch` compiled to a jump table (`jmp *reg` /
 *      `notrack jmp *reg`); the selector comes from argc and a volatile
 *      array so it cannot be constant-folded, and each case does different
 *      work so gcc cannot turn the switch into a plain value lookup table;
 *   2. calls through an array of function pointers (`call *reg`), with the
 *      pointers read through a volatile so they are not devirtualized;
 *   3. a setjmp/longjmp round trip (glibc's longjmp ends in `jmp *reg`);
 *   4. a computed-goto (`goto *tbl[op]`) bytecode interpreter;
 * plus ordinary returns throughout.  Prints per-part results and a checksum.
 * Expected: fixed text (see README.md), exit 0.
 */
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>

static volatile unsigned seed_data[16] = {
    3, 7, 1, 11, 0, 5, 9, 2, 8, 4, 10, 6, 1, 3, 7, 0
};

static uint32_t mix(uint32_t h, uint32_t v)
{
    h ^= v;
    h *= 0x01000193u;
    return h;
}

/* ---- 1. jump-table switch ------------------------------------------- */
__attribute__((noinline)) static uint32_t do_switch(unsigned sel, uint32_t x)
{
    switch (sel) {
    case 0:  x = x * 3 + 1;               break;
    case 1:  x ^= x >> 3;                 break;
    case 2:  x = (x << 5) | (x >> 27);    break;
    case 3:  x += 0x9e3779b9u;            break;
    case 4:  x = ~x;                      break;
    case 5:  x -= x / 7;                  break;
    case 6:  x *= 2654435761u;            break;
    case 7:  x = (x & 0xffff) * 31 + 17;  break;
    case 8:  x ^= 0xdeadbeefu;            break;
    case 9:  x = x / 3 + (x % 3) * 1000;  break;
    case 10: x = (x >> 16) | (x << 16);   break;
    case 11: x += x << 4;                 break;
    default: x = 0;                       break;
    }
    return x;
}

/* ---- 2. function-pointer array -------------------------------------- */
static int f_add(int a, int b) { return a + b; }
static int f_sub(int a, int b) { return a - b; }
static int f_mul(int a, int b) { return a * b; }
static int f_xor(int a, int b) { return a ^ b; }
static int f_max(int a, int b) { return a > b ? a : b; }

static int (*fn_table[5])(int, int) = { f_add, f_sub, f_mul, f_xor, f_max };

/* ---- 3. setjmp/longjmp ---------------------------------------------- */
static jmp_buf jb;
static volatile int do_jump = 1;

__attribute__((noinline)) static int jumper(int depth, int code)
{
    if (depth == 0) {
        if (do_jump)
            longjmp(jb, code);
        return 0;
    }
    return jumper(depth - 1, code) + 1;   /* a real recursion, not a tail call */
}

/* setjmp, then longjmp back from 6 frames down, three times over. */
__attribute__((noinline)) static int sjlj(int *rounds_out)
{
    volatile int rounds = 0;
    int rc = setjmp(jb);
    if (rc < 3) {
        rounds = rounds + 1;
        jumper(5, rc + 1);
    }
    *rounds_out = rounds;
    return rc;
}

/* ---- 4. computed goto ------------------------------------------------ */
enum { OP_PUSH, OP_ADD, OP_MUL, OP_DUP, OP_SWAP, OP_DEC, OP_JNZ, OP_POP,
       OP_HALT, OP_ROTADD };

/* acc = 1; for (n = 10; n; n--) acc = acc * 3 + n; push (acc + 5) * 2 */
static volatile int program[] = {
    OP_PUSH, 1,         /* 0: [acc]                          */
    OP_PUSH, 10,        /* 2: [acc n]                        */
    OP_SWAP,            /* 4: [n acc]            loop head   */
    OP_PUSH, 3,         /*    [n acc 3]                      */
    OP_MUL,             /*    [n acc*3]                      */
    OP_SWAP,            /*    [acc*3 n]                      */
    OP_DUP,             /*    [acc*3 n n]                    */
    OP_ROTADD,          /*    [acc*3+n n]                    */
    OP_DEC,             /*    [acc' n-1]                     */
    OP_DUP,             /*    [acc' n-1 n-1]                 */
    OP_JNZ, 4,          /*    pop; loop while n-1 != 0       */
    OP_POP,             /*    [acc']                         */
    OP_PUSH, 5,
    OP_ADD,
    OP_PUSH, 2,
    OP_MUL,
    OP_HALT,
};

__attribute__((noinline)) static long run_vm(const volatile int *code,
                                             unsigned *steps_out)
{
    static void *const ops[] = {
        &&op_push, &&op_add, &&op_mul, &&op_dup, &&op_swap,
        &&op_dec, &&op_jnz, &&op_pop, &&op_halt, &&op_rotadd,
    };
    long st[16];
    int sp = 0, pc = 0;
    unsigned steps = 0;

#define NEXT do { steps++; goto *ops[code[pc++]]; } while (0)
    NEXT;
op_push:   st[sp++] = code[pc++];                                        NEXT;
op_add:    sp--; st[sp - 1] += st[sp];                                   NEXT;
op_mul:    sp--; st[sp - 1] *= st[sp];                                   NEXT;
op_dup:    st[sp] = st[sp - 1]; sp++;                                    NEXT;
op_swap:   { long t = st[sp - 1]; st[sp - 1] = st[sp - 2]; st[sp - 2] = t; } NEXT;
op_dec:    st[sp - 1]--;                                                 NEXT;
op_jnz:    { int tgt = code[pc++]; if (st[--sp]) pc = tgt; }             NEXT;
op_pop:    sp--;                                                         NEXT;
op_rotadd: sp--; st[sp - 2] += st[sp];   /* [a n n] -> [a+n n] */         NEXT;
op_halt:
#undef NEXT
    *steps_out = steps;
    return sp > 0 ? st[sp - 1] : -1;
}

int main(int argc, char **argv)
{
    (void)argv;
    uint32_t sum = 0x811c9dc5u;

    /* 1. switch: 240 dispatches, selector derived from argc + volatile data */
    uint32_t x = 12345;
    unsigned hits[12] = {0};
    for (unsigned i = 0; i < 240; i++) {
        unsigned sel = (seed_data[i & 15] + i + (unsigned)argc - 1) % 12;
        hits[sel]++;
        x = do_switch(sel, x);
        sum = mix(sum, x);
    }
    printf("switch: x=0x%08x hits=", x);
    for (int i = 0; i < 12; i++)
        printf("%u%c", hits[i], i == 11 ? '\n' : ',');

    /* 2. function pointers */
    int acc = 7;
    for (int i = 0; i < 50; i++) {
        int (*volatile fp)(int, int) = fn_table[(i + argc - 1) % 5];
        acc = fp(acc, i + 1) & 0xffff;
        sum = mix(sum, (uint32_t)acc);
    }
    printf("fnptr: acc=%d\n", acc);

    /* 3. setjmp/longjmp */
    int rounds;
    int rc = sjlj(&rounds);
    printf("longjmp: rc=%d rounds=%d\n", rc, rounds);
    sum = mix(sum, (uint32_t)rc);
    sum = mix(sum, (uint32_t)rounds);

    /* 4. computed goto */
    unsigned steps = 0;
    long vm = run_vm(program, &steps);
    printf("goto: result=%ld steps=%u\n", vm, steps);
    sum = mix(sum, (uint32_t)vm);
    sum = mix(sum, steps);

    printf("checksum: 0x%08x\n", sum);
    return 0;
}
