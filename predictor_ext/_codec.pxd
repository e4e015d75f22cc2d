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
    cdef bytearray probs_arr
    cdef unsigned int[:] probs
    cdef int zrun
    cdef int lastk
    cdef int lastneg
    cdef int lastspec

    @cython.locals(i=Py_ssize_t)
    @cython.final
    cdef void reset_model(self) noexcept
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
                         long long[:] qout, int want_q) except *

@cython.locals(j=Py_ssize_t)
cdef void _encode_columns(Encoder enc, const double[:] xs, const unsigned long long[:] xbits,
                          Py_ssize_t n, double[:] tols, long long[:] kinds, long long[:] alphas,
                          long long[:] betas, double[:] recon, unsigned long long[:] rbits,
                          long long[:] qout, int want_q) except *

@cython.locals(i=Py_ssize_t, step=double, trend=int, specials=int, have=int, s="long long",
               t="long long", p="long long", q="long long", r="long long", lv="long long",
               sk=int)
cdef void _decode_column(Decoder dec, double[:] out, unsigned long long[:] obits, Py_ssize_t off,
                         Py_ssize_t n, double tol, int kind, long long alpha,
                         long long beta) except *

@cython.locals(j=Py_ssize_t)
cdef void _decode_columns(Decoder dec, double[:] out, unsigned long long[:] obits, Py_ssize_t n,
                          double[:] tols, long long[:] kinds, long long[:] alphas,
                          long long[:] betas) except *

@cython.locals(i=Py_ssize_t, prev="long long", pd="long long", v="long long", dl="long long")
cdef void _encode_ints(Encoder enc, const long long[:] vs, Py_ssize_t n, long long first,
                       int ddelta) except *

@cython.locals(i=Py_ssize_t, prev="long long", pd="long long", v="long long", dl="long long",
               q="long long")
cdef void _decode_ints(Decoder dec, long long[:] out, Py_ssize_t n, long long first,
                       int ddelta) except *


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
