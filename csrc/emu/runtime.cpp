// The CUDA emulator's runtime: grid and block scheduling, fibers, barriers, warp
// shuffles, atomics, and the race detector fed by -fsanitize=thread instrumentation of the
// kernel translation units. This file itself is never instrumented. Design and limits:
// csrc/emu/README.md.
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_emu.h"

#if !defined(__x86_64__) || !defined(__linux__)
#error "the CUDA emulator's fibers are written for x86-64 Linux"
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SEGMAMBA_EMU_ASAN 1
#else
#define SEGMAMBA_EMU_ASAN 0
#endif

// Bounds of the section holding every __shared__ variable, from the linker.
extern "C" char __start_segmamba_emu_shared[] __attribute__((weak));
extern "C" char __stop_segmamba_emu_shared[] __attribute__((weak));

// ---------------------------------------------------------------------------- context switch
// segmamba_emu_switch(save, load): saves the callee-saved registers and the FP control
// words on the current stack, stores the stack pointer in *save, and resumes the context
// whose stack pointer is `load`. A new fiber's stack is prepared so that the first switch
// "returns" into segmamba_emu_fiber_start with the fiber in r12.
asm(R"(
    .text
    .p2align 4
    .globl segmamba_emu_switch
    .hidden segmamba_emu_switch
    .type segmamba_emu_switch, @function
segmamba_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size segmamba_emu_switch, .-segmamba_emu_switch

    .p2align 4
    .globl segmamba_emu_fiber_start
    .hidden segmamba_emu_fiber_start
    .type segmamba_emu_fiber_start, @function
segmamba_emu_fiber_start:
    movq %r12, %rdi
    call segmamba_emu_fiber_main
    ud2
    .size segmamba_emu_fiber_start, .-segmamba_emu_fiber_start
)");

namespace segmamba_emu {
struct Fiber;
}
extern "C" {
void segmamba_emu_switch(void** save_sp, void* load_sp);
void segmamba_emu_fiber_start();
__attribute__((visibility("hidden"), noreturn)) void segmamba_emu_fiber_main(segmamba_emu::Fiber* fiber);
}

namespace segmamba_emu {

ExecState g_exec;

namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kMaxThreads = 1024;
// ASan's redzones make frames several times larger.
constexpr size_t kStackSize = SEGMAMBA_EMU_ASAN ? (size_t(1) << 20) : (size_t(128) << 10);

[[noreturn]] void fatal(const char* what) {
    std::fprintf(stderr, "segmamba CUDA emulator: %s\n", what);
    std::abort();
}

std::string hex(const void* p) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%p", p);
    return buf;
}

std::string demangle(const char* name) {
    int status = 0;
    std::unique_ptr<char, void (*)(void*)> d(abi::__cxa_demangle(name, nullptr, nullptr, &status), std::free);
    std::string s = status == 0 && d ? d.get() : name;
    for (const char* ns : {"segmamba_cuda::", "segmamba_emu::", "c10::"})
        for (size_t pos; (pos = s.find(ns)) != std::string::npos;) s.erase(pos, std::strlen(ns));
    return s;
}

// "function+0xoffset" for a code address, "variable+offset" for a data address.
std::string symbolize(const void* addr) {
    Dl_info info;
    if (dladdr(addr, &info) && info.dli_sname) {
        char off[32];
        std::snprintf(off, sizeof off, "+0x%zx",
                      static_cast<size_t>(static_cast<const char*>(addr) - static_cast<const char*>(info.dli_saddr)));
        return demangle(info.dli_sname) + off;
    }
    return hex(addr);
}

std::string kernel_name(const void* kernel) {
    Dl_info info;
    if (dladdr(kernel, &info) && info.dli_sname) {
        std::string s = demangle(info.dli_sname);
        if (s.rfind("void ", 0) == 0) s.erase(0, 5);
        const size_t paren = s.find('(');
        return paren == std::string::npos ? s : s.substr(0, paren);
    }
    return hex(kernel);
}

uint64_t splitmix64(uint64_t& state) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void permute(std::vector<int>& v, Order order, uint64_t seed) {
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<int>(i);
    if (order == Order::kReverse) {
        std::reverse(v.begin(), v.end());
    } else if (order == Order::kRandom) {
        uint64_t state = seed;
        for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[splitmix64(state) % i]);
    }
}

// ---------------------------------------------------------------------------- race detector
// One Shadow per 2-byte granule (the smallest element the kernels access). It keeps the
// last plain write, the reads and the atomics seen, each with the block, the thread and
// the barrier epoch of the access. Two accesses conflict when at least one is a plain
// write (or one is atomic and the other plain) and they come from different blocks (no
// order exists between blocks of one launch) or from different threads of one block in
// the same epoch (no __syncthreads between them).
enum Kind : int { kRead = 0, kWrite = 1, kAtomic = 2 };
constexpr int32_t kNone = -1, kSeveral = -2;

struct Access {
    int32_t block = kNone;  // launch level: kNone, one block, or kSeveral
    int32_t iblock = kNone, tid = kNone;  // the latest epoch's accesses: block, thread (or kSeveral)
    uint32_t epoch = 0;
    const void* pc = nullptr;
};

struct Shadow {
    uint64_t tag = 0;  // global memory: granule + 1; shared memory: block serial
    Access write, read, atomic;
};

// Set by __tsan_init, which instrumented translation units call from their static
// constructors, possibly before RaceState's: a constant-initialised flag of its own.
bool g_hooks_seen = false;

struct RaceState {
    bool tracking = false;    // a fiber runs kernel code and race checks are on
    uintptr_t stack_lo = 0, stack_span = 0;
    uintptr_t shared_lo = 0, shared_span = 0;
    int32_t block = 0;
    uint32_t epoch = 1;
    int32_t tid = 0;
    uint64_t block_serial = 0;
    std::vector<Shadow> shared;
    std::vector<Shadow> global;  // open addressing on the granule, cleared per launch
    size_t global_used = 0;
    size_t races = 0;
    std::vector<std::string> reports;
    std::vector<std::tuple<const void*, const void*, int, int>> report_keys;
    dim3 grid;
    std::string kernel;
};
RaceState g_race;

std::string block_str(int32_t linear) {
    const unsigned gx = g_race.grid.x, gy = g_race.grid.y;
    const unsigned x = linear % gx, y = (linear / gx) % gy, z = linear / (gx * gy);
    return "(" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + ")";
}

const char* kind_name(int k) { return k == kRead ? "read" : k == kWrite ? "plain write" : "atomic"; }

void report(int kind, const Access& other, int other_kind, uintptr_t addr, const void* pc) {
    ++g_race.races;
    if (g_race.reports.size() >= 6) return;
    // One report per pair of code locations, not per granule.
    const std::tuple<const void*, const void*, int, int> key{pc, other.pc, kind, other_kind};
    for (const auto& k : g_race.report_keys)
        if (k == key) return;
    g_race.report_keys.push_back(key);
    const bool shared = addr - g_race.shared_lo < g_race.shared_span;
    const int32_t oblock = other.iblock != kNone ? other.iblock : other.block;
    std::string who = oblock == kSeveral ? "several blocks" : "block " + block_str(oblock);
    if (other.tid >= 0 && oblock == g_race.block) who += " thread " + std::to_string(other.tid);
    std::string msg = std::string("race on ") + (shared ? "shared memory " + symbolize(reinterpret_cast<void*>(addr))
                                                         : "global memory " + hex(reinterpret_cast<void*>(addr))) +
                      ": " + kind_name(kind) + " by block " + block_str(g_race.block) + " thread " +
                      std::to_string(g_race.tid) + " at " + symbolize(pc) + " conflicts with the " +
                      kind_name(other_kind) + " by " + who + " at " + symbolize(other.pc) +
                      (oblock == g_race.block ? " with no __syncthreads() between them" : "");
    g_race.reports.push_back(std::move(msg));
}

// Does `a` (a record of accesses of one kind) conflict with an access of the current thread?
bool conflicts(const Access& a) {
    if (a.block == kNone) return false;
    if (a.block == kSeveral || a.block != g_race.block) return true;
    return a.iblock == g_race.block && a.epoch == g_race.epoch && (a.tid == kSeveral || a.tid != g_race.tid);
}

void note(Access& a, const void* pc, bool single) {
    a.block = a.block == kNone || a.block == g_race.block ? g_race.block : kSeveral;
    if (!single && a.iblock == g_race.block && a.epoch == g_race.epoch) {
        if (a.tid != g_race.tid) a.tid = kSeveral;
    } else {
        a.iblock = g_race.block;
        a.epoch = g_race.epoch;
        a.tid = g_race.tid;
    }
    a.pc = pc;
}

void check(Shadow& s, int kind, uintptr_t addr, const void* pc) {
    if (conflicts(s.write)) report(kind, s.write, kWrite, addr, pc);
    if (kind != kRead && conflicts(s.read)) report(kind, s.read, kRead, addr, pc);
    if (kind != kAtomic && conflicts(s.atomic)) report(kind, s.atomic, kAtomic, addr, pc);
    if (kind == kWrite) {
        s.write = {};
        note(s.write, pc, true);
    } else {
        note(kind == kRead ? s.read : s.atomic, pc, false);
    }
}

Shadow& global_shadow(uint64_t granule) {
    std::vector<Shadow>& t = g_race.global;
    if (2 * (g_race.global_used + 1) > t.size()) {
        std::vector<Shadow> old(std::max<size_t>(t.size() * 2, size_t(1) << 16));
        old.swap(t);
        g_race.global_used = 0;
        for (const Shadow& s : old)
            if (s.tag != 0) global_shadow(s.tag - 1) = s;
    }
    const size_t mask = t.size() - 1;
    for (size_t i = (granule * 0x9e3779b97f4a7c15ull) >> 20 & mask;; i = (i + 1) & mask) {
        if (t[i].tag == granule + 1) return t[i];
        if (t[i].tag == 0) {
            ++g_race.global_used;
            t[i].tag = granule + 1;
            return t[i];
        }
    }
}

void on_access(const void* p, unsigned size, int kind, const void* pc) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a - g_race.stack_lo < g_race.stack_span) return;  // a fiber's own stack
    if (a - reinterpret_cast<uintptr_t>(&g_exec) < sizeof g_exec) return;
    for (uintptr_t g = a >> 1, end = (a + size - 1) >> 1; g <= end; ++g) {
        const uintptr_t addr = g << 1;
        if (addr - g_race.shared_lo < g_race.shared_span) {
            Shadow& s = g_race.shared[(addr - g_race.shared_lo) >> 1];
            if (s.tag != g_race.block_serial) s = Shadow{g_race.block_serial};
            check(s, kind, addr, pc);
        } else {
            check(global_shadow(g), kind, addr, pc);
        }
    }
}

inline void hook(const void* p, unsigned size, int kind, const void* pc) {
    if (g_race.tracking) on_access(p, size, kind, pc);
}

// ---------------------------------------------------------------------------- fibers and blocks
enum class State : uint8_t { kRunnable, kBarrier, kShuffle, kDone, kFailed };

}  // namespace

struct Fiber {
    void* sp = nullptr;
    char* stack_lo = nullptr;
    int tid = 0;
    State state = State::kRunnable;
    const void* site = nullptr;  // where it waits: the caller of __syncthreads or of the shuffle
    int kind = 0, arg = 0, width = 0;
    unsigned mask = 0, size = 0;
    alignas(8) unsigned char in[8], out[8];
    void* fake_stack = nullptr;  // ASan's bookkeeping across switches
};

namespace {

struct Runtime {
    Config config;
    std::vector<LaunchRecord> log;
    uint64_t launch_serial = 0;
    char* stacks = nullptr;
    size_t stack_stride = 0, stack_count = 0;
    std::vector<Fiber> fibers;
    void* sched_sp = nullptr;
    void* sched_fake_stack = nullptr;
    const void* main_stack_bottom = nullptr;
    size_t main_stack_size = 0;
    Fiber* current = nullptr;
    Entry entry = nullptr;
    void* ctx = nullptr;
    std::string fiber_error;  // set by a fiber before it switches out as kFailed
    bool stacks_dirty = false;
};
Runtime g_rt;

void asan_start_switch(void** fake_save, const void* bottom, size_t size) {
#if SEGMAMBA_EMU_ASAN
    __sanitizer_start_switch_fiber(fake_save, bottom, size);
#else
    (void)fake_save, (void)bottom, (void)size;
#endif
}

void asan_finish_switch(void* fake_save, const void** bottom_old, size_t* size_old) {
#if SEGMAMBA_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake_save, bottom_old, size_old);
#else
    (void)fake_save, (void)bottom_old, (void)size_old;
#endif
}

// One guard page below each fiber stack: an overflow faults instead of corrupting a neighbour.
void ensure_stacks(size_t count) {
    if (count <= g_rt.stack_count) return;
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t stride = kStackSize + page;
    if (g_rt.stacks) munmap(g_rt.stacks, g_rt.stack_stride * g_rt.stack_count);
    void* mem = mmap(nullptr, stride * count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) throw std::runtime_error("CUDA emulator: cannot map fiber stacks");
    g_rt.stacks = static_cast<char*>(mem);
    g_rt.stack_stride = stride;
    g_rt.stack_count = count;
    for (size_t i = 0; i < count; ++i)
        if (mprotect(g_rt.stacks + i * stride, page, PROT_NONE) != 0)
            throw std::runtime_error("CUDA emulator: cannot protect a fiber stack guard page");
    g_rt.fibers.assign(count, Fiber{});
    for (size_t i = 0; i < count; ++i) g_rt.fibers[i].stack_lo = g_rt.stacks + i * stride + page;
    g_race.stack_lo = reinterpret_cast<uintptr_t>(g_rt.stacks);
    g_race.stack_span = stride * count;
}

void init_fiber(Fiber& f, int tid) {
    f.tid = tid;
    f.state = State::kRunnable;
    f.site = nullptr;
    f.fake_stack = nullptr;
    const uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack_lo) + kStackSize) & ~uintptr_t(15);
    // Frame popped by segmamba_emu_switch: FP control words, r15..r12, rbx, rbp, return address.
    void** s = reinterpret_cast<void**>(top - 16);
    s[-1] = reinterpret_cast<void*>(&segmamba_emu_fiber_start);
    for (int i = 2; i <= 7; ++i) s[-i] = nullptr;
    s[-4] = &f;  // r12
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    char* csr = reinterpret_cast<char*>(s - 8);
    std::memcpy(csr, &mxcsr, 4);
    std::memcpy(csr + 4, &fpucw, 2);
    f.sp = csr;
}

void set_thread_index(int tid) {
    const unsigned bx = g_exec.block_dim.x, by = g_exec.block_dim.y;
    g_exec.thread_idx = {tid % bx, (tid / bx) % by, tid / (bx * by)};
}

void resume(Fiber& f) {
    g_rt.current = &f;
    set_thread_index(f.tid);
    g_race.tid = f.tid;
    g_race.tracking = g_rt.config.race_check;
    asan_start_switch(&g_rt.sched_fake_stack, f.stack_lo, kStackSize);
    segmamba_emu_switch(&g_rt.sched_sp, f.sp);
    asan_finish_switch(g_rt.sched_fake_stack, nullptr, nullptr);
    g_race.tracking = false;
    g_rt.current = nullptr;
}

// Called on a fiber: back to the scheduler until it resumes this fiber.
void suspend(Fiber& f) {
    asan_start_switch(&f.fake_stack, g_rt.main_stack_bottom, g_rt.main_stack_size);
    segmamba_emu_switch(&f.sp, g_rt.sched_sp);
    asan_finish_switch(f.fake_stack, nullptr, nullptr);
}

[[noreturn]] void fail_on_fiber(std::string msg) {
    Fiber& f = *g_rt.current;
    g_rt.fiber_error = std::move(msg);
    f.state = State::kFailed;
    suspend(f);
    fatal("a failed fiber was resumed");
}

struct LaunchError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Shuffle results for every lane of a warp whose 32 lanes have all arrived.
void complete_shuffle(Fiber* lanes, const std::string& where) {
    const Fiber& l0 = lanes[0];
    for (int l = 1; l < kWarpSize; ++l) {
        const Fiber& f = lanes[l];
        if (f.site != l0.site || f.kind != l0.kind || f.width != l0.width || f.size != l0.size)
            throw LaunchError(where + ": lanes " + std::to_string(l0.tid) + " and " + std::to_string(f.tid) +
                              " of one warp met at different shuffles (" + symbolize(l0.site) + " and " +
                              symbolize(f.site) + ")");
    }
    const int width = l0.width;
    for (int l = 0; l < kWarpSize; ++l) {
        Fiber& f = lanes[l];
        const int in_seg = l % width, base = l - in_seg;
        int src = l;
        switch (f.kind) {
            case kShflXor: src = (l ^ f.arg) >= base + width || (l ^ f.arg) < base ? l : l ^ f.arg; break;
            case kShflUp: src = in_seg >= f.arg ? l - f.arg : l; break;
            case kShflDown: src = in_seg + f.arg < width ? l + f.arg : l; break;
            case kShflIdx: src = base + ((f.arg % width) + width) % width; break;
            default: throw LaunchError(where + ": unknown shuffle kind");
        }
        std::memcpy(f.out, lanes[src].in, f.size);
    }
    for (int l = 0; l < kWarpSize; ++l) lanes[l].state = State::kRunnable;
}

std::string describe_waits(const std::vector<Fiber>& fibers, int n) {
    int barrier = 0, shuffle = 0, done = 0;
    const Fiber* first_shuffle = nullptr;
    const Fiber* first_barrier = nullptr;
    const Fiber* first_done = nullptr;
    for (int t = 0; t < n; ++t) {
        const Fiber& f = fibers[t];
        if (f.state == State::kBarrier) ++barrier, first_barrier = first_barrier ? first_barrier : &f;
        if (f.state == State::kShuffle) ++shuffle, first_shuffle = first_shuffle ? first_shuffle : &f;
        if (f.state == State::kDone) ++done, first_done = first_done ? first_done : &f;
    }
    std::string s = std::to_string(barrier) + " thread(s) wait at __syncthreads()" +
                    (first_barrier ? " (thread " + std::to_string(first_barrier->tid) + " at " +
                                         symbolize(first_barrier->site) + ")"
                                   : "") +
                    ", " + std::to_string(shuffle) + " at a warp shuffle" +
                    (first_shuffle ? " (thread " + std::to_string(first_shuffle->tid) + " at " +
                                         symbolize(first_shuffle->site) + ")"
                                   : "") +
                    ", " + std::to_string(done) + " returned" +
                    (first_done ? " (first: thread " + std::to_string(first_done->tid) + ")" : "");
    return s;
}

void run_block(int linear, const std::string& where) {
    const int n = static_cast<int>(g_exec.block_dim.x * g_exec.block_dim.y * g_exec.block_dim.z);
    const unsigned gx = g_exec.grid_dim.x, gy = g_exec.grid_dim.y;
    g_exec.block_idx = {linear % gx, (linear / gx) % gy, linear / (gx * gy)};
    // Shared memory starts as all-ones bytes: NaN as float or double, so a read before
    // the first write shows in the results.
    std::memset(__start_segmamba_emu_shared, 0xff, g_race.shared_span);
    g_race.block = linear;
    g_race.epoch = 1;
    ++g_race.block_serial;
    for (int t = 0; t < n; ++t) init_fiber(g_rt.fibers[t], t);
    const int warps = (n + kWarpSize - 1) / kWarpSize;
    std::vector<int> arrived(warps, 0), order(n);
    uint64_t phase = 0;
    auto reorder = [&] {
        uint64_t seed = g_rt.config.seed ^ (g_rt.launch_serial << 40) ^ (uint64_t(linear) << 16) ^ phase++;
        permute(order, g_rt.config.thread_order, splitmix64(seed));
    };
    reorder();
    int at_barrier = 0, done = 0;
    for (;;) {
        bool ran = false;
        for (int t : order) {
            Fiber& f = g_rt.fibers[t];
            if (f.state != State::kRunnable) continue;
            ran = true;
            resume(f);
            switch (f.state) {
                case State::kFailed: throw LaunchError(where + " thread " + std::to_string(t) + ": " + g_rt.fiber_error);
                case State::kBarrier: ++at_barrier; break;
                case State::kDone: ++done; break;
                case State::kShuffle: {
                    const int w = t / kWarpSize;
                    if ((w + 1) * kWarpSize > n)
                        throw LaunchError(where + ": thread " + std::to_string(t) +
                                          " shuffles in a partial warp (blockDim not a multiple of 32)");
                    if (++arrived[w] == kWarpSize) {
                        arrived[w] = 0;
                        complete_shuffle(&g_rt.fibers[w * kWarpSize], where);
                    }
                    break;
                }
                case State::kRunnable: fatal("a fiber switched out while runnable");
            }
        }
        if (done == n) return;
        if (at_barrier + done == n) {
            if (done > 0)
                throw LaunchError(where + ": barrier divergence: " + describe_waits(g_rt.fibers, n) +
                                  "; every thread of a block must reach each __syncthreads()");
            for (int t = 1; t < n; ++t)
                if (g_rt.fibers[t].site != g_rt.fibers[0].site)
                    throw LaunchError(where + ": barrier divergence: thread 0 waits at __syncthreads() " +
                                      symbolize(g_rt.fibers[0].site) + ", thread " + std::to_string(t) + " at " +
                                      symbolize(g_rt.fibers[t].site));
            for (int t = 0; t < n; ++t) g_rt.fibers[t].state = State::kRunnable;
            at_barrier = 0;
            ++g_race.epoch;
            reorder();
            continue;
        }
        if (!ran)
            throw LaunchError(where + ": deadlock (a warp shuffle that not all 32 lanes reach, or a barrier "
                                      "inside a diverged warp): " +
                              describe_waits(g_rt.fibers, n));
    }
}

void check_launch_config(const std::string& name, dim3 grid, dim3 block) {
    const uint64_t threads = uint64_t(block.x) * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0)
        throw LaunchError(name + ": invalid launch configuration (a zero grid or block dimension)");
    if (threads > kMaxThreads || block.z > 64)
        throw LaunchError(name + ": too many threads per block (" + std::to_string(threads) + ")");
    if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
        throw LaunchError(name + ": grid dimensions exceed the CUDA limits");
}

}  // namespace

void set_config(const Config& config) {
    g_rt.config = config;
    g_rt.launch_serial = 0;
}

Config get_config() { return g_rt.config; }

std::vector<LaunchRecord> take_launch_log() {
    std::vector<LaunchRecord> out;
    out.swap(g_rt.log);
    return out;
}

bool race_hooks_seen() { return g_hooks_seen; }

void run_grid(const void* kernel, dim3 grid, dim3 block, Entry entry, void* ctx) {
    if (g_rt.current != nullptr) fatal("a kernel launch from inside a kernel");
    const std::string name = kernel_name(kernel);
    check_launch_config(name, grid, block);
    g_rt.log.push_back({name, {grid.x, grid.y, grid.z}, {block.x, block.y, block.z}});
    ++g_rt.launch_serial;
    const unsigned threads = block.x * block.y * block.z;
    ensure_stacks(threads);
    if (g_rt.stacks_dirty) {
#if SEGMAMBA_EMU_ASAN
        // Frames of fibers abandoned by an aborted launch left their redzones poisoned.
        __asan_unpoison_memory_region(g_rt.stacks, g_rt.stack_stride * g_rt.stack_count);
#endif
        g_rt.stacks_dirty = false;
    }
    g_race.shared_lo = reinterpret_cast<uintptr_t>(__start_segmamba_emu_shared);
    g_race.shared_span = static_cast<size_t>(__stop_segmamba_emu_shared - __start_segmamba_emu_shared);
    if (g_race.shared.size() < g_race.shared_span / 2) g_race.shared.assign(g_race.shared_span / 2, Shadow{});
    std::fill(g_race.global.begin(), g_race.global.end(), Shadow{});
    g_race.global_used = 0;
    g_race.races = 0;
    g_race.reports.clear();
    g_race.report_keys.clear();
    g_race.grid = grid;
    g_race.kernel = name;
    g_exec.grid_dim = grid;
    g_exec.block_dim = block;
    g_rt.entry = entry;
    g_rt.ctx = ctx;

    const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
    std::vector<int> blocks(nblocks);
    permute(blocks, g_rt.config.block_order, g_rt.config.seed * 0x2545f4914f6cdd1dull + g_rt.launch_serial);
    for (int b : blocks) {
        const std::string where = name + " block " + block_str(b);
        try {
            run_block(b, where);
        } catch (const LaunchError&) {
            g_rt.stacks_dirty = true;
            throw;
        }
    }
    if (g_race.races > 0) {
        std::string msg = name + ": " + std::to_string(g_race.races) + " racing access(es) detected";
        for (const std::string& r : g_race.reports) msg += "\n  " + r;
        throw LaunchError(msg);
    }
}

}  // namespace segmamba_emu

using segmamba_emu::g_rt;
using segmamba_emu::Fiber;

extern "C" void segmamba_emu_fiber_main(Fiber* f) {
    segmamba_emu::asan_finish_switch(nullptr, &g_rt.main_stack_bottom, &g_rt.main_stack_size);
    g_rt.entry(g_rt.ctx);
    f->state = segmamba_emu::State::kDone;
    segmamba_emu::asan_start_switch(nullptr, g_rt.main_stack_bottom, g_rt.main_stack_size);
    segmamba_emu_switch(&f->sp, g_rt.sched_sp);
    __builtin_unreachable();
}

void segmamba_emu::barrier() {
    Fiber& f = *g_rt.current;
    f.state = segmamba_emu::State::kBarrier;
    f.site = __builtin_return_address(0);
    segmamba_emu::suspend(f);
}

void segmamba_emu::shuffle(int kind, unsigned mask, const void* in, void* out, unsigned size, int arg, int width) {
    Fiber& f = *g_rt.current;
    const void* site = __builtin_return_address(0);
    if (mask != 0xffffffffu)
        fail_on_fiber("warp shuffle at " + symbolize(site) + " with mask " + hex(reinterpret_cast<void*>(uintptr_t(mask))) +
                      ": the emulator supports full-warp masks only");
    if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0)
        fail_on_fiber("warp shuffle at " + symbolize(site) + ": width must be a power of two in [1, 32], got " +
                      std::to_string(width));
    f.kind = kind;
    f.mask = mask;
    f.arg = arg;
    f.width = width;
    f.size = size;
    f.site = site;
    std::memcpy(f.in, in, size);
    f.state = State::kShuffle;
    suspend(f);
    std::memcpy(out, f.out, size);
}

// ---------------------------------------------------------------------------- atomics
// Blocks and threads run one at a time, so a plain read-modify-write is atomic here;
// what matters is that the race detector knows these accesses are atomic.
namespace {
template <typename T>
T atomic_add(T* address, T val, const void* pc) {
    segmamba_emu::hook(address, sizeof(T), segmamba_emu::kAtomic, pc);
    const T old = *address;
    *address = old + val;
    return old;
}
}  // namespace

float atomicAdd(float* a, float v) { return atomic_add(a, v, __builtin_return_address(0)); }
double atomicAdd(double* a, double v) { return atomic_add(a, v, __builtin_return_address(0)); }
int atomicAdd(int* a, int v) { return atomic_add(a, v, __builtin_return_address(0)); }
unsigned atomicAdd(unsigned* a, unsigned v) { return atomic_add(a, v, __builtin_return_address(0)); }
unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
    return atomic_add(a, v, __builtin_return_address(0));
}
float4 atomicAdd(float4* a, float4 v) {
    const void* pc = __builtin_return_address(0);
    if (reinterpret_cast<uintptr_t>(a) % 16 != 0)
        segmamba_emu::fail_on_fiber("atomicAdd(float4*) at " + segmamba_emu::symbolize(pc) +
                                    " on an address that is not 16-byte aligned: " + segmamba_emu::hex(a));
    segmamba_emu::hook(a, 16, segmamba_emu::kAtomic, pc);
    const float4 old = *a;
    *a = {old.x + v.x, old.y + v.y, old.z + v.z, old.w + v.w};
    return old;
}
int atomicOr(int* a, int v) {
    segmamba_emu::hook(a, sizeof(int), segmamba_emu::kAtomic, __builtin_return_address(0));
    const int old = *a;
    *a = old | v;
    return old;
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t count, cudaStream_t) {
    std::memset(dst, value, count);
    return cudaSuccess;
}

// ---------------------------------------------------------------------------- -fsanitize=thread hooks
// GCC instruments every load and store of the kernel translation units with these calls;
// this runtime (not libtsan) implements them as the race detector above.
extern "C" {
void __tsan_init() { segmamba_emu::g_hooks_seen = true; }
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
#define SEGMAMBA_EMU_HOOKS(N)                                                                                \
    void __tsan_read##N(void* a) { segmamba_emu::hook(a, N, segmamba_emu::kRead, __builtin_return_address(0)); } \
    void __tsan_write##N(void* a) { segmamba_emu::hook(a, N, segmamba_emu::kWrite, __builtin_return_address(0)); } \
    void __tsan_unaligned_read##N(void* a) {                                                                  \
        segmamba_emu::hook(a, N, segmamba_emu::kRead, __builtin_return_address(0));                          \
    }                                                                                                        \
    void __tsan_unaligned_write##N(void* a) {                                                                 \
        segmamba_emu::hook(a, N, segmamba_emu::kWrite, __builtin_return_address(0));                         \
    }
SEGMAMBA_EMU_HOOKS(1)
SEGMAMBA_EMU_HOOKS(2)
SEGMAMBA_EMU_HOOKS(4)
SEGMAMBA_EMU_HOOKS(8)
SEGMAMBA_EMU_HOOKS(16)
#undef SEGMAMBA_EMU_HOOKS
void __tsan_read_range(void* a, unsigned long size) {
    segmamba_emu::hook(a, static_cast<unsigned>(size), segmamba_emu::kRead, __builtin_return_address(0));
}
void __tsan_write_range(void* a, unsigned long size) {
    segmamba_emu::hook(a, static_cast<unsigned>(size), segmamba_emu::kWrite, __builtin_return_address(0));
}
}
