# C types for _codec.py when Cython compiles it; the pure twin never reads this file.
cimport cython

cdef int _SCALE_BITS
cdef double _STEP_SCALE
cdef long long _SCALE
cdef double _INV_SCALE
cdef double _D_MAX
cdef long long _L_MAX
cdef long long _T_MAX
cdef long long _Q_MAX
cdef long long _I_MAX
cdef double _DBL_MAX
cdef unsigned int _TOP
cdef unsigned long long _U32
cdef unsigned long long _LOW_CARRY
cdef unsigned int _PROB_INIT
cdef unsigned int _P_MIN
cdef unsigned int _P_MAX
cdef unsigned int _YOUNG
cdef unsigned int _RATE_SHIFT
cdef Py_ssize_t _C_ZERO
cdef Py_ssize_t _C_SIGN
cdef Py_ssize_t _C_MAG
cdef Py_ssize_t _C_MANT
cdef Py_ssize_t _C_SPEC
cdef Py_ssize_t _C_KIND
cdef Py_ssize_t _N_CTX
cdef int _K_MAX
cdef long long _ST_MAGIC
cdef Py_ssize_t _H_MAGIC
cdef Py_ssize_t _H_NF
cdef Py_ssize_t _H_WARM
cdef Py_ssize_t _H_TS
cdef Py_ssize_t _H_SEQ
cdef Py_ssize_t _ST_HEAD
cdef Py_ssize_t _R_ZRUN
cdef Py_ssize_t _R_LASTK
cdef Py_ssize_t _R_LASTNEG
cdef Py_ssize_t _R_LASTSPEC
cdef Py_ssize_t _R_HAVE
cdef Py_ssize_t _R_S
cdef Py_ssize_t _R_T
cdef Py_ssize_t _R_PROBS
cdef Py_ssize_t _REC
cdef int _SPEC_NAN
cdef int _SPEC_MISSING
cdef int _SPEC_POS_INF
cdef int _SPEC_NEG_INF
cdef int _SPEC_RAW
cdef unsigned long long _MISSING_BITS
cdef unsigned long long _NAN_BITS
cdef unsigned long long _POS_INF_BITS
cdef unsigned long long _NEG_INF_BITS
cdef unsigned long long _EXP_BITS


cpdef double reconstruct(long long r, double step) noexcept

@cython.locals(q="long long")
cpdef long long floor_int(double t) noexcept

cpdef long long quantise(double d, long long p) noexcept

cdef inline long long _clamp(long long v, long long lim) noexcept

cdef int _special_kind(unsigned long long b) noexcept

cdef unsigned long long _special_bits(int kind, unsigned long long raw) noexcept

@cython.locals(k=int)
cdef int _bit_length(unsigned long long m) noexcept


@cython.locals(p=cython.uint, n=cython.uint)
cdef inline unsigned int _adapt(unsigned int s, int b) noexcept


cdef class _Model:
    cdef unsigned int[:] probs
    cdef int zrun
    cdef int lastk
    cdef int lastneg
    cdef int lastspec

    @cython.final
    cdef int load_model(self, long long[:] w, unsigned int[:] u, Py_ssize_t rec) except -1
    @cython.final
    cdef void save_model(self, long long[:] w, Py_ssize_t rec) noexcept
    @cython.locals(lk=int)
    @cython.final
    cdef inline Py_ssize_t zero_ctx(self) noexcept
    @cython.final
    cdef inline Py_ssize_t sign_ctx(self) noexcept
    @cython.locals(lk=int)
    @cython.final
    cdef inline Py_ssize_t mag_ctx(self, int j) noexcept
    @cython.final
    cdef inline void saw_zero(self) noexcept
    @cython.final
    cdef inline void saw_nonzero(self, int k, int neg) noexcept


@cython.final
cdef class Encoder(_Model):
    cdef unsigned long long low
    cdef unsigned int rng
    cdef unsigned int cache
    cdef long long cache_size
    cdef bytearray data
    cdef unsigned char[:] buf
    cdef Py_ssize_t pos
    cdef Py_ssize_t cap

    @cython.locals(grown=bytearray)
    cdef int reserve(self, Py_ssize_t k) except -1
    cdef void _out(self, unsigned int b) noexcept
    @cython.locals(carry=cython.uint, temp=cython.uint)
    cdef void _shift_low(self) noexcept
    @cython.locals(st=cython.uint, bound=cython.uint)
    cdef inline void bit(self, Py_ssize_t i, int b) noexcept
    cdef void bypass(self, unsigned long long v, int nbits) noexcept
    @cython.locals(neg=int, m="unsigned long long", k=int, j=int)
    cdef void put_int(self, long long q) noexcept
    cdef void put_special(self, int kind, unsigned long long raw) noexcept
    cdef void special_flag(self, int f) noexcept
    @cython.locals(neg=int, m="unsigned long long", k=int)
    cdef void put_first(self, long long q) noexcept
    cpdef bytes finish(self)


@cython.final
cdef class Decoder(_Model):
    cdef object data
    cdef const unsigned char[:] buf
    cdef Py_ssize_t pos
    cdef Py_ssize_t end
    cdef int overrun
    cdef unsigned long long raw
    cdef unsigned int rng
    cdef unsigned int code

    @cython.locals(b=cython.uint)
    cdef inline unsigned int _in(self) noexcept
    @cython.locals(st=cython.uint, bound=cython.uint, b=int)
    cdef inline int bit(self, Py_ssize_t i) noexcept
    @cython.locals(v="unsigned long long")
    cdef unsigned long long bypass(self, int nbits) noexcept
    @cython.locals(neg=int, m="unsigned long long", k=int)
    cdef long long get_int(self) noexcept
    @cython.locals(hi="unsigned long long")
    cdef int get_special(self) noexcept
    @cython.locals(f=int)
    cdef int special_flag(self) noexcept
    @cython.locals(neg=int, k=int, m="unsigned long long")
    cdef long long get_first(self)


@cython.locals(i=Py_ssize_t, step=double, trend=int, specials=int, have=int, s="long long",
               t="long long", x=double, d=double, p="long long", q="long long", r="long long",
               y=double, lv="long long", sk=int, raw="unsigned long long")
cdef void _encode_column(Encoder enc, const double[:] xs, const unsigned long long[:] xbits,
                         Py_ssize_t off, Py_ssize_t n, double tol, int kind, long long alpha,
                         long long beta, double[:] recon, unsigned long long[:] rbits,
                         long long[:] qout, int want_q, long long[:] w, unsigned int[:] u,
                         Py_ssize_t rec) except *

@cython.locals(j=Py_ssize_t)
cdef void _encode_columns(Encoder enc, const double[:] xs, const unsigned long long[:] xbits,
                          Py_ssize_t n, double[:] tols, long long[:] kinds, long long[:] alphas,
                          long long[:] betas, double[:] recon, unsigned long long[:] rbits,
                          long long[:] qout, int want_q, long long[:] w,
                          unsigned int[:] u) except *

@cython.locals(i=Py_ssize_t, step=double, trend=int, specials=int, have=int, s="long long",
               t="long long", p="long long", q="long long", r="long long", lv="long long",
               sk=int)
cdef void _decode_column(Decoder dec, double[:] out, unsigned long long[:] obits, Py_ssize_t off,
                         Py_ssize_t n, double tol, int kind, long long alpha,
                         long long beta, long long[:] w, unsigned int[:] u,
                         Py_ssize_t rec) except *

@cython.locals(j=Py_ssize_t)
cdef void _decode_columns(Decoder dec, double[:] out, unsigned long long[:] obits, Py_ssize_t n,
                          double[:] tols, long long[:] kinds, long long[:] alphas,
                          long long[:] betas, long long[:] w, unsigned int[:] u) except *

@cython.locals(i=Py_ssize_t, start=Py_ssize_t, prev="long long", pd="long long", v="long long",
               dl="long long")
cdef void _encode_ints(Encoder enc, const long long[:] vs, Py_ssize_t n, long long[:] w,
                       unsigned int[:] u, Py_ssize_t hv, Py_ssize_t rec, int ddelta) except *

@cython.locals(i=Py_ssize_t, start=Py_ssize_t, prev="long long", pd="long long", v="long long",
               dl="long long", q="long long")
cdef void _decode_ints(Decoder dec, long long[:] out, Py_ssize_t n, long long first,
                       long long[:] w, unsigned int[:] u, Py_ssize_t hv, Py_ssize_t rec,
                       int ddelta) except *

@cython.locals(c=Py_ssize_t, rec=Py_ssize_t, hv=Py_ssize_t, base=Py_ssize_t, i=Py_ssize_t,
               st=cython.uint)
cdef int _state_ok(const long long[:] w, const unsigned int[:] u, Py_ssize_t ncol) except -1


@cython.locals(ordered=int, last="long long", i=Py_ssize_t, t="long long", k="long long")
cdef Py_ssize_t _bucket_keys(const long long[:] ts, Py_ssize_t n, long long b,
                             long long[:] keys) noexcept

@cython.locals(nb=Py_ssize_t, i=Py_ssize_t)
cdef Py_ssize_t _run_ids(const long long[:] keys, Py_ssize_t n, long long[:] ids) noexcept

@cython.locals(i=Py_ssize_t)
cdef void _put_starts(const long long[:] keys, const long long[:] ids, Py_ssize_t n,
                      long long[:] starts) noexcept

@cython.locals(i=Py_ssize_t, k="long long", lo=Py_ssize_t, hi=Py_ssize_t, mid=Py_ssize_t)
cdef void _find_ids(const long long[:] keys, Py_ssize_t n, const long long[:] starts,
                    Py_ssize_t nb, long long[:] ids) noexcept

@cython.locals(j=Py_ssize_t, base=Py_ssize_t, i=Py_ssize_t, x=double, o=Py_ssize_t, c=double)
cdef void _accumulate(const double[:] xs, const long long[:] ids, Py_ssize_t n, Py_ssize_t nf,
                      double[:] out, unsigned long long[:] obits) noexcept

@cython.locals(j=Py_ssize_t, b=Py_ssize_t, k=Py_ssize_t, o=Py_ssize_t, n=double, total=double,
               lo=double, hi=double, c=double)
cdef void _merge(const double[:] src, Py_ssize_t nparts, Py_ssize_t nf, double[:] out,
                 unsigned long long[:] obits) noexcept


cdef int _PACK_HEADER
cdef int _MAX_SCALE
cdef long long _I16_MISSING
cdef long long _I32_MISSING
cdef unsigned int _F32_MISSING_BITS

@cython.locals(k=int, p10=double, ok=int, i=Py_ssize_t, x=double, r="long long")
cdef int _decimal_scale(const double[:] xs, const unsigned long long[:] bits, Py_ssize_t n) except? -2

@cython.locals(i=Py_ssize_t, x=double)
cdef int _fits_f32(const double[:] xs, const unsigned long long[:] bits, Py_ssize_t n,
                   float[:] f32) except? -2

@cython.locals(i=Py_ssize_t)
cdef void _put_ints(const double[:] xs, const unsigned long long[:] bits, Py_ssize_t n,
                    double p10, long long[:] body, long long missing) except *

@cython.locals(i=Py_ssize_t, r="long long")
cdef void _get_ints(const long long[:] ints, Py_ssize_t n, double p10, long long missing,
                    double[:] out) except *
