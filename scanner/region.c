/* scan_region in C: the scan of scanner/region.py, step for step, so that a page
 * costs capstone's decoding and little more. region.py is the reference (and what
 * runs where this is not built); tests hold the two to the same results.
 *
 * Per-offset arrays replace region.py's dicts and sets: the decoded instruction at
 * each offset (decoded once, lazily, in linear runs that stop where they fall into
 * step), and bitmaps for known starts, found starts, interior and occupied bytes.
 * What needs an instruction's operand text (direct targets, `int 3`, rip-relative
 * `lea`) reads capstone's op_str the way sensitive.py and window.py read
 * disasm_lite's, and the per-id facts (terminator, direct branch, call, ...) come
 * from Python's own tables (sbe_scan's `info`), so no table is kept twice.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <capstone/capstone.h>

#define SBE_TERMINATOR 1
#define SBE_DIRECT 2
#define SBE_CANDIDATE 4
#define SBE_CALL 8
#define SBE_LEA 16
#define SBE_INT 32
#define SBE_SYSREG 64       /* a site only with a control or debug register operand */

#define MAX_INSN 15
#define SWEEP_ROUNDS 4

enum { UNKNOWN = 0, DECODED = 1, NONE = 2 };

struct sbe_site {
    uint32_t offset;
    uint8_t size;
    char mnemonic[32];
    char op_str[160];
};

struct sbe_scan {
    uint32_t *starts;      /* offsets of every instruction the scan reached */
    uint8_t *sizes;
    size_t nstarts;
    uint64_t *targets;     /* window.targets_of over them */
    size_t ntargets;
    uint64_t *outside;     /* entries found beyond the region */
    size_t noutside;
    struct sbe_site *sites; /* those whose id may be a site: Python classifies */
    size_t nsites;
    size_t swept;
};

struct list {
    uint64_t *items;
    size_t n, cap;
};

static int push(struct list *l, uint64_t v) {
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 64;
        uint64_t *items = realloc(l->items, cap * sizeof *items);
        if (!items)
            return -1;
        l->items = items;
        l->cap = cap;
    }
    l->items[l->n++] = v;
    return 0;
}

struct scan {
    const uint8_t *code;
    size_t len;            /* bytes of code: the region and up to 15 more (or fewer) */
    size_t region;         /* end - base */
    uint64_t base;
    csh cs;
    cs_insn *insn;
    const uint8_t *info;
    size_t ninfo;
    uint8_t *state, *size, *flags, *known, *starts, *interior, *occupied;
    uint64_t *target;      /* direct target, valid where flags has SBE_DIRECT */
    int32_t *site;         /* index into sites, or -1 */
    size_t span;           /* bytes the per-offset arrays cover */
    const uint64_t *known_all;  /* the known starts beyond the arrays, sorted */
    size_t nknown;
    struct sbe_site *sites;
    size_t nsites, capsites;
    int failed;
};

static int parse_imm(const char *op, uint64_t *value) {
    if (op[0] < '0' || op[0] > '9')
        return 0;
    *value = strtoull(op, NULL, 0);
    return 1;
}

/* Whether `op` may name a control or debug register (cr0, dr7, ...). */
static int sysreg(const char *op) {
    for (const char *p = op; (p = strchr(p, 'r')) != NULL; p++)
        if (p > op && (p[-1] == 'c' || p[-1] == 'd') && p[1] >= '0' && p[1] <= '9')
            return 1;
    return 0;
}

static void record(struct scan *s, size_t off, const cs_insn *insn) {
    unsigned id = insn->id;
    uint8_t info = id < s->ninfo ? s->info[id] : 0;
    uint8_t flags = 0;
    uint64_t imm = 0;
    int has_imm = parse_imm(insn->op_str, &imm);
    s->state[off] = DECODED;
    s->size[off] = (uint8_t)insn->size;
    if (info & SBE_TERMINATOR || (info & SBE_INT && has_imm && imm == 3))
        flags |= SBE_TERMINATOR;
    if (info & SBE_DIRECT && has_imm) {
        flags |= SBE_DIRECT;
        s->target[off] = imm;
    }
    flags |= info & (SBE_CALL | SBE_LEA);
    s->flags[off] = flags;
    /* Python's sensitive.classify decides; what it surely turns down is not handed
     * over (a direct jmp or call, a mov without a control or debug register). */
    if (info & SBE_CANDIDATE && !(info & SBE_DIRECT && has_imm) && !(info & SBE_SYSREG && !sysreg(insn->op_str))) {
        if (s->nsites == s->capsites) {
            size_t cap = s->capsites ? 2 * s->capsites : 32;
            struct sbe_site *sites = realloc(s->sites, cap * sizeof *sites);
            if (!sites) {
                s->failed = 1;
                return;
            }
            s->sites = sites;
            s->capsites = cap;
        }
        struct sbe_site *site = &s->sites[s->nsites];
        site->offset = (uint32_t)off;
        site->size = (uint8_t)insn->size;
        memcpy(site->mnemonic, insn->mnemonic, sizeof site->mnemonic);
        memcpy(site->op_str, insn->op_str, sizeof site->op_str);
        s->site[off] = (int32_t)s->nsites++;
    }
}

/* _Decoded.at: the instruction at `off`, decoding a linear run from there that
 * stops at an instruction decoded before or at a known start other than `off`. */
static int at(struct scan *s, size_t off) {
    if (off >= s->len)
        return 0;       /* a region may reach past its bytes: nothing decodes there */
    if (s->state[off] == UNKNOWN) {
        const uint8_t *p = s->code + off;
        size_t left = s->len - off;
        uint64_t address = s->base + off;
        while (left) {
            size_t here = (size_t)(address - s->base);
            if (!cs_disasm_iter(s->cs, &p, &left, &address, s->insn))
                break;
            if (s->state[here] != UNKNOWN || (s->known[here] && here != off))
                break;
            record(s, here, s->insn);
        }
        if (s->state[off] == UNKNOWN)
            s->state[off] = NONE;
    }
    return s->state[off] == DECODED;
}

static int known_beyond(const struct scan *s, uint64_t address) {
    size_t lo = 0, hi = s->nknown;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (s->known_all[mid] < address)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < s->nknown && s->known_all[lo] == address;
}

static int overlaps(const uint8_t *bytes, size_t off, size_t size) {
    for (size_t i = off; i < off + size; i++)
        if (bytes[i])
            return 1;
    return 0;
}

/* _descend: what control flow reaches from `pending`; found starts are marked in
 * s->starts (and in `more` when given), beyond-the-region entries go to `outside`. */
static int descend(struct scan *s, struct list *pending, int covered, struct list *more,
                   struct list *outside) {
    while (pending->n) {
        uint64_t address = pending->items[--pending->n];
        for (;;) {
            if (address - s->base < s->region) {
                size_t off = (size_t)(address - s->base);
                if (s->starts[off] || s->known[off])
                    break;
            } else {
                int known = address - s->base < s->span ? s->known[address - s->base]
                                                        : known_beyond(s, address);
                if (!known && push(outside, address))
                    return -1;
                break;
            }
            size_t off = (size_t)(address - s->base);
            if (!at(s, off))
                break;
            if (covered && overlaps(s->occupied, off, s->size[off]))
                break;
            s->starts[off] = 1;
            if (more && push(more, off))
                return -1;
            if (s->flags[off] & SBE_DIRECT && push(pending, s->target[off]))
                return -1;
            if (s->flags[off] & SBE_TERMINATOR)
                break;
            address += s->size[off];
        }
    }
    return 0;
}

static void claim(struct scan *s, size_t off) {
    size_t size = s->size[off];
    memset(s->interior + off + 1, 1, size - 1);
    memset(s->occupied + off, 1, size);
}

static int zero_at(const struct scan *s, size_t off) {
    return off + 2 <= s->len && s->code[off] == 0 && s->code[off + 1] == 0;
}

/* _sweep_gap: the gap [start, stop) decoded linearly into `run`, or left empty
 * when it does not look like code. */
static void sweep_gap(struct scan *s, size_t start, size_t stop, struct list *run) {
    size_t first = run->n;
    size_t off = start;
    while (off < stop) {
        if (zero_at(s, off))
            return;
        if (!at(s, off)) {
            int cut_off = stop == s->region && s->base + off + MAX_INSN > s->base + s->len;
            if (!cut_off)
                run->n = first;
            return;
        }
        if (push(run, off)) {
            s->failed = 1;
            return;
        }
        off += s->size[off];
    }
    if (!(off == stop || stop == s->region))
        run->n = first;
}

static int sweep(struct scan *s, struct list *outside, size_t *swept_count) {
    struct list swept = {0}, targets = {0}, more = {0};
    int rc = 0;
    for (size_t off = 0; off < s->region; off++)
        if (s->known[off] && at(s, off))
            claim(s, off);
    for (size_t off = 0; off < s->region; off++)
        if (s->starts[off])
            claim(s, off);
    for (int round = 0; round < SWEEP_ROUNDS; round++) {
        swept.n = targets.n = more.n = 0;
        /* The gaps are those at the round's start: nothing is claimed while sweeping. */
        size_t off = 0;
        while (off < s->region) {
            if (s->occupied[off]) {
                off++;
                continue;
            }
            size_t start = off;
            while (off < s->region && !s->occupied[off])
                off++;
            if (start == 0)
                continue;   /* nothing decoded ends there: its alignment would be a guess */
            size_t before = swept.n;
            sweep_gap(s, start, off, &swept);
            if (s->failed)
                goto out;
            if (swept.n > before) {
                size_t last = (size_t)swept.items[swept.n - 1];
                if (last + s->size[last] >= s->region && !(s->flags[last] & SBE_TERMINATOR)
                    && push(outside, s->base + last + s->size[last]))
                    goto fail;
            }
        }
        *swept_count += swept.n;
        for (size_t i = 0; i < swept.n; i++)
            s->starts[swept.items[i]] = 1;
        for (size_t i = 0; i < swept.n; i++)
            claim(s, (size_t)swept.items[i]);
        for (size_t i = 0; i < swept.n; i++) {
            size_t at_off = (size_t)swept.items[i];
            if (!(s->flags[at_off] & SBE_DIRECT))
                continue;
            uint64_t t = s->target[at_off];
            if (t - s->base < s->len && s->interior[t - s->base])
                continue;   /* inside a decoded instruction: out of step with it */
            if (push(&targets, t))
                goto fail;
        }
        if (descend(s, &targets, 1, &more, outside))
            goto fail;
        if (!more.n)
            break;
        for (size_t i = 0; i < more.n; i++)
            claim(s, (size_t)more.items[i]);
    }
    goto out;
fail:
    rc = -1;
out:
    free(swept.items);
    free(targets.items);
    free(more.items);
    return s->failed ? -1 : rc;
}

/* The rip-relative address of a `lea`'s "[rip + 0x10]" / "[rip - 8]" operand. */
static int rip_lea(const char *op, uint64_t end, uint64_t *target) {
    const char *p = strstr(op, "[rip ");
    if (!p || (p[5] != '+' && p[5] != '-') || p[6] != ' ' || p[7] < '0' || p[7] > '9')
        return 0;
    char *stop;
    uint64_t disp = strtoull(p + 7, &stop, 0);
    if (*stop != ']')
        return 0;
    *target = p[5] == '+' ? end + disp : end - disp;
    return 1;
}

static csh handle;
static cs_insn *scratch;

int sbe_scan_init(void) {
    if (handle)
        return 0;
    if (cs_open(CS_ARCH_X86, CS_MODE_64, &handle) != CS_ERR_OK)
        return -1;
    scratch = cs_malloc(handle);
    return scratch ? 0 : -1;
}

/* The names of capstone's instruction ids 0 .. X86_INS_ENDING - 1, each ended by a
 * NUL, into `buf`: the per-id `info` table is made from the scanner's tables of
 * names, with no capstone binding loaded in Python. Returns the bytes needed. */
size_t sbe_insn_names(char *buf, size_t cap) {
    size_t used = 0;
    if (sbe_scan_init())
        return 0;
    for (unsigned id = 0; id < X86_INS_ENDING; id++) {
        const char *name = cs_insn_name(handle, id);
        size_t n = (name ? strlen(name) : 0) + 1;
        if (used + n <= cap) {
            if (name)
                memcpy(buf + used, name, n);
            else
                buf[used] = 0;
        }
        used += n;
    }
    return used;
}

static int by_value(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* `known`: in any order. Those within the arrays go into `s.known`; only the others
 * are kept, sorted, for known_beyond (an extension scan of a page hands over the
 * page's thousand starts, all within it: sorting them, in Python before, cost more
 * than the scan). */
int sbe_scan(const uint8_t *code, size_t len, uint64_t base, uint64_t end,
             const uint64_t *entries, size_t nentries, const uint64_t *known, size_t nknown,
             int sweep_gaps, const uint8_t *info, size_t ninfo, struct sbe_scan *out) {
    struct scan s = {0};
    struct list pending = {0}, outside = {0}, targets = {0};
    uint64_t *sorted_known = NULL;
    int rc = -1;
    memset(out, 0, sizeof *out);
    if (sbe_scan_init() || end < base || end - base > ((size_t)1 << 40))
        return -1;
    s.code = code;
    s.len = len;
    s.region = (size_t)(end - base);
    s.base = base;
    s.cs = handle;
    s.insn = scratch;
    s.info = info;
    s.ninfo = ninfo;
    size_t n = (len > s.region ? len : s.region) + 1;
    s.state = calloc(n, 1);
    s.size = calloc(n, 1);
    s.flags = calloc(n, 1);
    s.known = calloc(n, 1);
    s.starts = calloc(n, 1);
    s.interior = calloc(n + MAX_INSN, 1);
    s.occupied = calloc(n + MAX_INSN, 1);
    s.target = calloc(n, sizeof *s.target);
    s.site = malloc(n * sizeof *s.site);
    if (!s.state || !s.size || !s.flags || !s.known || !s.starts || !s.interior || !s.occupied
        || !s.target || !s.site)
        goto done;
    memset(s.site, 0xff, n * sizeof *s.site);
    s.span = n;
    size_t beyond = 0;
    for (size_t i = 0; i < nknown; i++)
        beyond += known[i] - base >= n;
    sorted_known = malloc((beyond ? beyond : 1) * sizeof *sorted_known);
    if (!sorted_known)
        goto done;
    beyond = 0;
    for (size_t i = 0; i < nknown; i++)
        if (known[i] - base >= n)
            sorted_known[beyond++] = known[i];
    qsort(sorted_known, beyond, sizeof *sorted_known, by_value);
    s.known_all = sorted_known;
    s.nknown = beyond;
    for (size_t i = 0; i < nknown; i++)
        if (known[i] - base < n)
            s.known[known[i] - base] = 1;
    for (size_t i = nentries; i-- > 0;)
        if (entries[i] - base < s.region && push(&pending, entries[i]))
            goto done;
    if (descend(&s, &pending, 0, NULL, &outside) || s.failed)
        goto done;
    if (sweep_gaps && sweep(&s, &outside, &out->swept))
        goto done;

    size_t count = 0;
    for (size_t off = 0; off < s.region; off++)
        count += s.starts[off];
    out->starts = malloc((count ? count : 1) * sizeof *out->starts);
    out->sizes = malloc(count ? count : 1);
    out->sites = malloc((s.nsites ? s.nsites : 1) * sizeof *out->sites);
    if (!out->starts || !out->sizes || !out->sites)
        goto done;
    for (size_t off = 0; off < s.region; off++) {
        if (!s.starts[off])
            continue;
        uint64_t address = base + off, after = address + s.size[off];
        uint8_t flags = s.flags[off];
        out->starts[out->nstarts] = (uint32_t)off;
        out->sizes[out->nstarts++] = s.size[off];
        if (s.site[off] >= 0)
            out->sites[out->nsites++] = s.sites[s.site[off]];
        /* window.targets_of */
        if (flags & SBE_DIRECT && push(&targets, s.target[off]))
            goto done;
        if (flags & (SBE_CALL | SBE_TERMINATOR)) {
            if (push(&targets, after))
                goto done;
        } else if (flags & SBE_LEA) {
            uint64_t t;
            /* operand text is kept for candidate sites only; a lea is decoded again */
            const uint8_t *p = code + off;
            size_t left = len - off;
            uint64_t a = address;
            if (cs_disasm_iter(handle, &p, &left, &a, scratch) && rip_lea(scratch->op_str, after, &t)
                && push(&targets, t))
                goto done;
        }
    }
    out->targets = targets.items;
    out->ntargets = targets.n;
    targets.items = NULL;
    out->outside = outside.items;
    out->noutside = outside.n;
    outside.items = NULL;
    rc = 0;
done:
    free(sorted_known);
    free(s.state);
    free(s.size);
    free(s.flags);
    free(s.known);
    free(s.starts);
    free(s.interior);
    free(s.occupied);
    free(s.target);
    free(s.site);
    free(s.sites);
    free(pending.items);
    free(outside.items);
    free(targets.items);
    return rc;
}

void sbe_scan_free(struct sbe_scan *out) {
    free(out->starts);
    free(out->sizes);
    free(out->targets);
    free(out->outside);
    free(out->sites);
    memset(out, 0, sizeof *out);
}
