"""The error-bounded predictor codec: closed-loop smoothing, context models, range coder.

This one file is both implementations. Run as plain Python it is the pure twin; compiled by
Cython together with ``_codec.pxd`` (which only adds C types) it is the extension. Every
arithmetic step is written so that Python ints and C 64-bit ints give the same result: no
value leaves the ranges the comments state, and the predictor state is fixed-point integers,
so neither implementation nor any C compiler (FMA contraction included) can change a result.

Layout of one coded block (one device's frames), all inside one range-coder stream:
timestamps (delta of delta), sequence numbers (delta minus one), then each field's column.

A block either starts cold (a keyframe: fresh context models, no prediction, the first
timestamp and sequence number sent outside the block) or continues from a state (new_state)
that the previous block left: every column's context model and predictor carry over, and
once the state has seen a row, row 0's timestamp and sequence number are coded in-stream like
any later row. Live uploads send a few rows every few seconds; restarting the models for each
costs several times the bits.
"""

import struct
from array import array

from ._errors import CodecError

# Fixed-point predictor state: values in units of the quantisation step (~2 * tol), _SCALE_BITS
# fractional bits. |x / step| < _D_MAX keeps every product below 2**62 (see _encode_column).
_SCALE_BITS = 12
# The quantisation step is a hair under 2 * tol, so that a value half a step from the
# prediction, after the few roundings of doubles, still lands within tol (costs 0.07% in size).
_STEP_SCALE = 2.0 - 1.0 / 1024
_SCALE = 1 << _SCALE_BITS
_INV_SCALE = 1.0 / _SCALE
_D_MAX = 17179869184.0  # 2**34
_L_MAX = 1 << 47  # clamp for level and prediction
_T_MAX = 1 << 46  # clamp for the trend
_Q_MAX = 1 << 36  # no residual of a valid stream reaches this
_I_MAX = 1 << 59  # timestamps and sequence numbers stay below this in magnitude
_DBL_MAX = 1.7976931348623157e308  # abs(x) <= _DBL_MAX: x is finite
ALPHA_ONE = 1 << 12  # smoothing factors are integers n / ALPHA_ONE

LEVEL = 0
TREND = 1

# Range coder (LZMA style): 32-bit range, 16-bit probabilities of a zero bit.
_TOP = 1 << 24
_U32 = 0xFFFFFFFF
_LOW_CARRY = 0xFF000000  # low at or above this may still carry into the cached byte
_PROB_INIT = 1 << 15
_P_MIN = 31
_P_MAX = 65536 - 31
# Adaptation: rate 1/(n+2) for the n-th update of a context (a KT estimator while young),
# then 1/2**_RATE_SHIFT.
_YOUNG = 30
_RATE_SHIFT = 5

# Context layout of one integer model (reset for each column).
_C_ZERO = 0  # 9: zero run (0, 1, 2+) x last magnitude class
_C_SIGN = 9  # 4: last sign x previous value was non-zero
_C_MAG = 13  # 6 x 24: unary bit length, by last bit length class
_C_MANT = 157  # 64: top mantissa bit, by bit length
_C_SPEC = 221  # 2: special value flag, by previous special
_C_KIND = 223  # 4: which special
_N_CTX = 227
_K_MAX = 63  # bit length of the largest magnitude (|q| < 2**63)

# The state a block continues from (new_state). It lives only in memory, never on the wire or
# on disk, so it is int64 words in native byte order: a header, then one record per column
# (timestamps, sequence numbers, then each field in order).
_ST_MAGIC = 0x6772_6964_7374_0001  # "gridst", layout 1
_H_MAGIC = 0
_H_NF = 1
_H_WARM = 2  # 1 once the state has seen a row: row 0's timestamp and seq are then in-stream
_H_TS = 3  # last timestamp, last timestamp delta
_H_SEQ = 5  # last sequence number, 0
_ST_HEAD = 8
_R_ZRUN = 0  # the context model's scalars
_R_LASTK = 1
_R_LASTNEG = 2
_R_LASTSPEC = 3
_R_HAVE = 4  # the predictor holds a value (a column of only special values has none yet)
_R_S = 5  # level, fixed point
_R_T = 6  # trend, fixed point
_R_PROBS = 8  # from this word on, the _N_CTX context states as uint32
_REC = _R_PROBS + (_N_CTX + 1) // 2

# Special values, coded only in columns that hold any.
_SPEC_NAN = 0
_SPEC_MISSING = 1
_SPEC_POS_INF = 2
_SPEC_NEG_INF = 3
_SPEC_RAW = 4

# Residual outputs mark special values as RESIDUAL_SPECIAL + their kind (NaN, missing, +inf,
# -inf, raw), far above any real residual.
RESIDUAL_SPECIAL = 1 << 40

# A missing value travels through float arrays as a NaN with this payload.
_MISSING_BITS = 0x7FF8_6772_6964_0001
MISSING_BITS = _MISSING_BITS
MISSING = struct.unpack("<d", struct.pack("<Q", _MISSING_BITS))[0]
_NAN_BITS = 0x7FF8_0000_0000_0000
_POS_INF_BITS = 0x7FF0_0000_0000_0000
_NEG_INF_BITS = 0xFFF0_0000_0000_0000
_EXP_BITS = 0x7FF0_0000_0000_0000


def reconstruct(r, step):
    """The value a fixed-point state ``r`` (units of step / _SCALE) stands for.

    float(r) is exact (|r| < 2**53), the product rounds once and the power-of-two scale is
    exact: no sum, so nothing for a compiler to contract.
    """
    return (r * step) * _INV_SCALE


def floor_int(t):
    """floor(t) as an int, for |t| < 2**62."""
    q = int(t)
    if q > t:
        q -= 1
    return q


def quantise(d, p):
    """round(d - p / _SCALE): the residual, in steps, of d against a fixed-point prediction p."""
    # p * _INV_SCALE is exact, so an FMA of the subtraction gives the same double.
    return floor_int((d - p * _INV_SCALE) + 0.5)


def _clamp(v, lim):
    if v > lim:
        return lim
    if v < -lim:
        return -lim
    return v


def _bit_length(m):
    k = 0
    while m:
        m >>= 1
        k += 1
    return k


def _adapt(s, b):
    """A context's state (16-bit probability of a zero, update count) after coding bit b."""
    p = s & 0xFFFF
    n = s >> 16
    if b:
        if n < _YOUNG:
            p -= p // (n + 2)
            n += 1
        else:
            p -= p >> _RATE_SHIFT
        if p < _P_MIN:
            p = _P_MIN
    else:
        if n < _YOUNG:
            p += (65536 - p) // (n + 2)
            n += 1
        else:
            p += (65536 - p) >> _RATE_SHIFT
        if p > _P_MAX:
            p = _P_MAX
    return p | (n << 16)


class _Model:
    """The adaptive context model of one column, the same on both sides of the coder. It works
    in place on the column's record of a state (load_model), so a block's models are the ones
    the state holds and, stored back (save_model), the ones the next block starts from."""

    def __init__(self):
        cold = memoryview(bytearray(_COLD_REC)).cast("I")
        self.probs = cold[2 * _R_PROBS : 2 * _R_PROBS + _N_CTX]
        self.zrun = 0
        self.lastk = 0
        self.lastneg = 0
        self.lastspec = 0

    def load_model(self, w, u, rec):
        """Code with the model of the state record at int64 word rec (w, u: the state as int64
        and as uint32 words); the context probabilities are used where they lie."""
        self.probs = u[2 * (rec + _R_PROBS) : 2 * (rec + _R_PROBS) + _N_CTX]
        self.zrun = w[rec + _R_ZRUN]
        self.lastk = w[rec + _R_LASTK]
        self.lastneg = w[rec + _R_LASTNEG]
        self.lastspec = w[rec + _R_LASTSPEC]
        return 0

    def save_model(self, w, rec):
        w[rec + _R_ZRUN] = self.zrun
        w[rec + _R_LASTK] = self.lastk
        w[rec + _R_LASTNEG] = self.lastneg
        w[rec + _R_LASTSPEC] = self.lastspec

    def zero_ctx(self):
        """Context of the zero flag: the zero run so far and the last bit length."""
        lk = self.lastk
        return _C_ZERO + self.zrun * 3 + (lk if lk < 3 else 2)

    def sign_ctx(self):
        return _C_SIGN + self.lastneg * 2 + (1 if self.zrun == 0 else 0)

    def mag_ctx(self, j):
        """Context of the j-th unary bit of a bit length, by the last bit length."""
        lk = self.lastk
        return _C_MAG + (lk if lk < 5 else 5) * 24 + (j - 1 if j < 24 else 23)

    def saw_zero(self):
        if self.zrun < 2:
            self.zrun += 1

    def saw_nonzero(self, k, neg):
        self.zrun = 0
        self.lastk = k
        self.lastneg = neg


class Encoder(_Model):
    """Binary range encoder with the integer context model of one column."""

    def __init__(self, size_hint=64):
        self.low = 0
        self.rng = _U32
        self.cache = 0
        self.cache_size = 1
        self.data = bytearray(max(16, size_hint))
        self.buf = self.data
        self.cap = len(self.data)
        self.pos = 0
        _Model.__init__(self)

    def reserve(self, k):
        """Make room for k more bytes; coding one value never writes more than 256."""
        if self.pos + k > self.cap:
            grown = bytearray(max(2 * self.cap, self.pos + k))
            grown[: self.pos] = self.data
            self.data = grown
            self.buf = self.data
            self.cap = len(grown)

    def _out(self, b):
        self.buf[self.pos] = b
        self.pos += 1

    def _shift_low(self):
        if self.low < _LOW_CARRY or self.low > _U32:
            carry = self.low >> 32
            temp = self.cache
            while True:
                self._out((temp + carry) & 0xFF)
                temp = 0xFF
                self.cache_size -= 1
                if self.cache_size == 0:
                    break
            self.cache = (self.low >> 24) & 0xFF
        self.cache_size += 1
        self.low = (self.low & 0x00FFFFFF) << 8

    def bit(self, i, b):
        """Code bit b with context i and adapt that context."""
        st = self.probs[i]
        bound = (self.rng >> 16) * (st & 0xFFFF)
        if b:
            self.low += bound
            self.rng -= bound
        else:
            self.rng = bound
        self.probs[i] = _adapt(st, b)
        while self.rng < _TOP:
            self.rng <<= 8
            self._shift_low()

    def bypass(self, v, nbits):
        """Code the low nbits of v, most significant first, at one bit each."""
        while nbits > 0:
            nbits -= 1
            self.rng >>= 1
            if (v >> nbits) & 1:
                self.low += self.rng
            while self.rng < _TOP:
                self.rng <<= 8
                self._shift_low()

    def put_int(self, q):
        """Code a signed residual with the adaptive zero / sign / bit-length / mantissa model."""
        if q == 0:
            self.bit(self.zero_ctx(), 0)
            self.saw_zero()
            return
        self.bit(self.zero_ctx(), 1)
        neg = 0
        m = q
        if q < 0:
            neg = 1
            m = -q
        self.bit(self.sign_ctx(), neg)
        k = _bit_length(m)
        j = 1
        while j < k:
            self.bit(self.mag_ctx(j), 1)
            j += 1
        if k < _K_MAX:
            self.bit(self.mag_ctx(k), 0)
        if k > 1:
            self.bit(_C_MANT + k, (m >> (k - 2)) & 1)
            if k > 2:
                self.bypass(m, k - 2)
        self.saw_nonzero(k, neg)

    def put_special(self, kind, raw):
        self.bit(_C_KIND, 1 if kind >= _SPEC_POS_INF else 0)
        if kind < _SPEC_POS_INF:
            self.bit(_C_KIND + 1, kind)
        else:
            self.bit(_C_KIND + 2, 1 if kind == _SPEC_RAW else 0)
            if kind == _SPEC_RAW:
                self.bypass(raw >> 32, 32)
                self.bypass(raw & _U32, 32)
            else:
                self.bit(_C_KIND + 3, kind - _SPEC_POS_INF)

    def special_flag(self, f):
        self.bit(_C_SPEC + self.lastspec, f)
        self.lastspec = f

    def put_first(self, q):
        """A column's first value against no prediction: sign and Elias-gamma, bypass coded."""
        neg = 0
        m = q
        if q < 0:
            neg = 1
            m = -q
        m += 1
        k = _bit_length(m)
        self.bypass(neg, 1)
        self.bypass(0, k - 1)
        self.bypass(m, k)

    def finish(self):
        self.reserve(16)
        for _ in range(5):
            self._shift_low()
        return bytes(self.data[: self.pos])


class Decoder(_Model):
    """The range decoder twin of Encoder; reading past the end is recorded, never a crash."""

    def __init__(self, data, start, end):
        self.data = data
        self.buf = data
        self.pos = start
        self.end = end
        self.overrun = 0
        self.raw = 0
        self.rng = _U32
        self.code = 0
        _Model.__init__(self)
        if end - start < 5 or self.buf[start] != 0:
            raise CodecError("coded block is too short or does not start a range-coder stream")
        self.pos += 1
        for _ in range(4):
            self.code = (self.code << 8) | self._in()

    def _in(self):
        if self.pos < self.end:
            b = self.buf[self.pos]
            self.pos += 1
            return b
        self.overrun += 1
        return 0

    def bit(self, i):
        st = self.probs[i]
        bound = (self.rng >> 16) * (st & 0xFFFF)
        if self.code >= bound:
            self.code -= bound
            self.rng -= bound
            b = 1
        else:
            self.rng = bound
            b = 0
        self.probs[i] = _adapt(st, b)
        while self.rng < _TOP:
            self.rng <<= 8
            self.code = (self.code << 8) | self._in()
        return b

    def bypass(self, nbits):
        v = 0
        while nbits > 0:
            nbits -= 1
            self.rng >>= 1
            v <<= 1
            if self.code >= self.rng:
                self.code -= self.rng
                v |= 1
            while self.rng < _TOP:
                self.rng <<= 8
                self.code = (self.code << 8) | self._in()
        return v

    def get_int(self):
        if self.bit(self.zero_ctx()) == 0:
            self.saw_zero()
            return 0
        neg = self.bit(self.sign_ctx())
        k = 1
        while k < _K_MAX and self.bit(self.mag_ctx(k)):
            k += 1
        m = 1
        if k > 1:
            m = 2 | self.bit(_C_MANT + k)
            if k > 2:
                m = (m << (k - 2)) | self.bypass(k - 2)
        self.saw_nonzero(k, neg)
        if neg:
            return -m
        return m

    def get_special(self):
        """The kind of a special value; for _SPEC_RAW its 64 bits are left in self.raw."""
        if self.bit(_C_KIND) == 0:
            return self.bit(_C_KIND + 1)
        if self.bit(_C_KIND + 2):
            hi = self.bypass(32)
            self.raw = (hi << 32) | self.bypass(32)
            return _SPEC_RAW
        return _SPEC_POS_INF + self.bit(_C_KIND + 3)

    def special_flag(self):
        f = self.bit(_C_SPEC + self.lastspec)
        self.lastspec = f
        return f

    def get_first(self):
        neg = self.bypass(1)
        k = 1
        while k < 64 and self.bypass(1) == 0:
            k += 1
        if k >= 64:
            raise CodecError("first value of a column is out of range")
        m = 1
        m = ((m << (k - 1)) | self.bypass(k - 1)) - 1
        if neg:
            return -m
        return m


def _special_kind(b):
    """Which special value the IEEE-754 bits b of a non-normal input stand for."""
    if b == _MISSING_BITS:
        return _SPEC_MISSING
    if b == _POS_INF_BITS:
        return _SPEC_POS_INF
    if b == _NEG_INF_BITS:
        return _SPEC_NEG_INF
    if (b & _EXP_BITS) == _EXP_BITS:
        return _SPEC_NAN
    return _SPEC_RAW


def _special_bits(kind, raw):
    """The IEEE-754 bits a decoded special value is written as (NaN is made canonical)."""
    if kind == _SPEC_NAN:
        return _NAN_BITS
    if kind == _SPEC_MISSING:
        return _MISSING_BITS
    if kind == _SPEC_POS_INF:
        return _POS_INF_BITS
    if kind == _SPEC_NEG_INF:
        return _NEG_INF_BITS
    return raw


def _encode_column(
    enc, xs, xbits, off, n, tol, kind, alpha, beta, recon, rbits, qout, want_q, w, u, rec
):
    """Code the n values of one field at xs[off:off + n]; recon receives at the same places
    what the decoder will reconstruct and, when want_q, qout the quantised residuals
    (RESIDUAL_SPECIAL + kind for special values). xbits and rbits are views of xs and recon
    as 64-bit words, for special values. The model and predictor start from, and are left
    in, the state record at word rec of w (u: the same state as uint32 words)."""
    step = tol * _STEP_SCALE
    trend = 1 if kind == TREND else 0
    specials = 0
    for i in range(off, off + n):
        if not (abs(xs[i] / step) < _D_MAX):  # NaN fails every comparison
            specials = 1
            break
    enc.load_model(w, u, rec)
    enc.bypass(specials, 1)
    have = w[rec + _R_HAVE]
    s = w[rec + _R_S]  # level (fixed point)
    t = w[rec + _R_T]  # trend (fixed point), TREND only
    for i in range(off, off + n):
        if enc.pos + 256 > enc.cap:
            enc.reserve(256)
        x = xs[i]
        d = x / step
        if specials:
            if not (abs(d) < _D_MAX):
                enc.special_flag(1)
                raw = xbits[i]
                sk = _special_kind(raw)
                enc.put_special(sk, raw)
                rbits[i] = _special_bits(sk, raw)
                if want_q:
                    qout[i] = RESIDUAL_SPECIAL + sk
                continue
            enc.special_flag(0)
        if trend:
            p = _clamp(s + t, _L_MAX)
        else:
            p = s
        if not have:
            p = 0
        q = quantise(d, p)
        r = p + q * _SCALE
        y = reconstruct(r, step)
        if abs(y - x) > tol:
            # Only float rounding near a half step lands here; the neighbour is inside tol.
            if y < x:
                q += 1
                r += _SCALE
            else:
                q -= 1
                r -= _SCALE
            y = reconstruct(r, step)
            if abs(y - x) > tol:
                raise CodecError("value %r cannot be held within tolerance %r" % (x, tol))
        recon[i] = y
        if want_q:
            qout[i] = q
        if not have:
            enc.put_first(q)
            s = r
            t = 0
            have = 1
            continue
        enc.put_int(q)
        if trend:
            lv = _clamp(p + (((r - p) * alpha) >> _SCALE_BITS), _L_MAX)
            t = _clamp(t + ((((lv - s) - t) * beta) >> _SCALE_BITS), _T_MAX)
            s = lv
        else:
            s = s + (((r - s) * alpha) >> _SCALE_BITS)
    w[rec + _R_HAVE] = have
    w[rec + _R_S] = s
    w[rec + _R_T] = t
    enc.save_model(w, rec)


def _decode_column(dec, out, obits, off, n, tol, kind, alpha, beta, w, u, rec):
    step = tol * _STEP_SCALE
    trend = 1 if kind == TREND else 0
    dec.load_model(w, u, rec)
    specials = dec.bypass(1)
    have = w[rec + _R_HAVE]
    s = w[rec + _R_S]
    t = w[rec + _R_T]
    for i in range(off, off + n):
        if specials and dec.special_flag():
            sk = dec.get_special()
            obits[i] = _special_bits(sk, dec.raw)
            continue
        if not have:
            q = dec.get_first()
            if q >= _D_MAX or q <= -_D_MAX:
                raise CodecError("first value of a column is out of range")
            r = q * _SCALE
            out[i] = reconstruct(r, step)
            s = r
            t = 0
            have = 1
            continue
        q = dec.get_int()
        if trend:
            p = _clamp(s + t, _L_MAX)
        else:
            p = s
        if q >= _Q_MAX or q <= -_Q_MAX:
            raise CodecError("residual out of range")
        r = p + q * _SCALE
        if r >= _L_MAX or r <= -_L_MAX:
            raise CodecError("reconstruction out of range")
        out[i] = reconstruct(r, step)
        if trend:
            lv = _clamp(p + (((r - p) * alpha) >> _SCALE_BITS), _L_MAX)
            t = _clamp(t + ((((lv - s) - t) * beta) >> _SCALE_BITS), _T_MAX)
            s = lv
        else:
            s = s + (((r - s) * alpha) >> _SCALE_BITS)
        if dec.overrun > 4:
            raise CodecError("coded block is truncated")
    w[rec + _R_HAVE] = have
    w[rec + _R_S] = s
    w[rec + _R_T] = t
    dec.save_model(w, rec)


def _encode_ints(enc, vs, n, w, u, hv, rec, ddelta):
    """Code an int64 series as deltas minus one, or deltas of deltas, against the last value
    and delta that the state's header holds at words hv and hv + 1; a cold state sends the
    first value outside the block. Leaves the last value and delta there."""
    enc.load_model(w, u, rec)
    prev = w[hv]
    pd = w[hv + 1]
    start = 0
    if not w[_H_WARM]:
        prev = vs[0]
        pd = 0
        start = 1
    for i in range(start, n):
        if enc.pos + 256 > enc.cap:
            enc.reserve(256)
        v = vs[i]
        if not (-_I_MAX < v < _I_MAX):
            raise ValueError("timestamp or sequence number out of range at row %d" % i)
        dl = v - prev
        if ddelta:
            enc.put_int(dl - pd)
            pd = dl
        else:
            enc.put_int(dl - 1)
        prev = v
    w[hv] = prev
    w[hv + 1] = pd
    enc.save_model(w, rec)


def _decode_ints(dec, out, n, first, w, u, hv, rec, ddelta):
    dec.load_model(w, u, rec)
    prev = w[hv]
    pd = w[hv + 1]
    start = 0
    if not w[_H_WARM]:
        out[0] = first
        prev = first
        pd = 0
        start = 1
    for i in range(start, n):
        q = dec.get_int()
        if q >= 4 * _I_MAX or q <= -4 * _I_MAX:
            raise CodecError("timestamp or sequence number out of range")
        if ddelta:
            dl = pd + q
            pd = dl
        else:
            dl = q + 1
        if dl >= 2 * _I_MAX or dl <= -2 * _I_MAX:
            raise CodecError("timestamp or sequence number out of range")
        v = prev + dl
        if v >= _I_MAX or v <= -_I_MAX:
            raise CodecError("timestamp or sequence number out of range")
        out[i] = v
        prev = v
        if dec.overrun > 4:
            raise CodecError("coded block is truncated")
    w[hv] = prev
    w[hv + 1] = pd
    dec.save_model(w, rec)


def check_params(tols, kinds, alphas, betas):
    """Validate per-field model parameters; raise ValueError naming the bad one."""
    nf = len(tols)
    if len(kinds) != nf or len(alphas) != nf or len(betas) != nf:
        raise ValueError("one tolerance, model kind and smoothing pair per field")
    for j in range(nf):
        tol = tols[j]
        if not (1e-12 <= tol <= 1e15):
            raise ValueError("field %d: tolerance %r is outside [1e-12, 1e15]" % (j, tol))
        if kinds[j] != LEVEL and kinds[j] != TREND:
            raise ValueError("field %d: unknown model kind %r" % (j, kinds[j]))
        if not (1 <= alphas[j] <= ALPHA_ONE) or not (0 <= betas[j] <= ALPHA_ONE):
            raise ValueError("field %d: smoothing factors out of range" % j)
    return array("d", tols), array("q", kinds), array("q", alphas), array("q", betas)


def _check_len(name, buf, n):
    if len(buf) != n:
        raise ValueError("%s holds %d values, expected %d" % (name, len(buf), n))


def _cold_record():
    rec = bytearray(8 * _REC)
    u = memoryview(rec).cast("I")
    for i in range(_N_CTX):
        u[2 * _R_PROBS + i] = _PROB_INIT
    return bytes(rec)


_COLD_REC = _cold_record()


def new_state(nf):
    """A cold state for a device with nf fields: the next block coded or decoded with it is a
    keyframe, and leaves in it what the block after continues from."""
    if nf < 0:
        raise ValueError("a state needs a field count >= 0, not %d" % nf)
    st = bytearray(8 * _ST_HEAD) + _COLD_REC * (nf + 2)
    w = memoryview(st).cast("q")
    w[_H_MAGIC] = _ST_MAGIC
    w[_H_NF] = nf
    w.release()
    return st


def _take_state(state, nf):
    """A working copy of the caller's state for nf fields (a cold one for None), so that the
    caller's is written only when a whole block has succeeded."""
    if state is None:
        return new_state(nf)
    if not isinstance(state, bytearray):
        raise TypeError("state must be a bytearray made by new_state")
    size = 8 * (_ST_HEAD + (nf + 2) * _REC)
    if len(state) != size:
        if len(state) > 8 * _ST_HEAD and (len(state) // 8 - _ST_HEAD) % _REC == 0:
            raise ValueError(
                "state is for %d fields, not %d" % ((len(state) // 8 - _ST_HEAD) // _REC - 2, nf)
            )
        raise ValueError("state of %d bytes is not one made by new_state" % len(state))
    work = bytearray(state)
    w = memoryview(work).cast("q")
    if w[_H_MAGIC] != _ST_MAGIC or w[_H_NF] != nf:
        raise ValueError("state is not one made by new_state(%d)" % nf)
    if not _state_ok(w, memoryview(work).cast("I"), nf + 2):
        raise ValueError("state is corrupt")
    w.release()
    return work


def _state_ok(w, u, ncol):
    """Whether every word of a state is one coding can leave: the compiled coder indexes its
    contexts with these values unchecked, and a zero probability would never renormalise."""
    if w[_H_WARM] != 0 and w[_H_WARM] != 1:
        return 0
    for hv in (_H_TS, _H_SEQ):
        if not (-_I_MAX < w[hv] < _I_MAX and -2 * _I_MAX < w[hv + 1] < 2 * _I_MAX):
            return 0
    for c in range(ncol):
        rec = _ST_HEAD + c * _REC
        if not (0 <= w[rec + _R_ZRUN] <= 2 and 0 <= w[rec + _R_LASTK] <= _K_MAX):
            return 0
        if not (0 <= w[rec + _R_LASTNEG] <= 1 and 0 <= w[rec + _R_LASTSPEC] <= 1):
            return 0
        if not (0 <= w[rec + _R_HAVE] <= 1):
            return 0
        if not (-_L_MAX <= w[rec + _R_S] <= _L_MAX and -_T_MAX <= w[rec + _R_T] <= _T_MAX):
            return 0
        base = 2 * (rec + _R_PROBS)
        for i in range(base, base + _N_CTX):
            st = u[i]
            if (st & 0xFFFF) < _P_MIN or (st & 0xFFFF) > _P_MAX or (st >> 16) > _YOUNG:
                return 0
    return 1


def encode_block(
    ts, seqs, values, tols, kinds, alphas, betas, recon=None, residuals=None, state=None
):
    """Code one device's n frames: ts and seqs are int64 buffers of n values, values a float64
    buffer of nf * n values, column-major (field j at [j * n, (j + 1) * n)), with a tolerance,
    model kind and smoothing pair per field. recon and residuals, when given, are float64 and
    int64 buffers of nf * n that receive the reconstructions and the quantised residuals.
    Returns the coded bytes; the first timestamp and sequence number travel outside unless a
    warm state is given. state (new_state) is where the block starts from; on success it is
    updated in place to where the next block continues."""
    n = len(ts)
    tol_a, kind_a, alpha_a, beta_a = check_params(tols, kinds, alphas, betas)
    nf = len(tol_a)
    _check_len("seqs", seqs, n)
    _check_len("values", values, nf * n)
    work = _take_state(state, nf)
    if n and not (-_I_MAX < ts[0] < _I_MAX and -_I_MAX < seqs[0] < _I_MAX):
        raise ValueError("timestamp or sequence number out of range at row 0")
    enc = Encoder(n * nf // 2 + 64)
    if n == 0:
        return enc.finish()
    w = memoryview(work).cast("q")
    u = memoryview(work).cast("I")
    _encode_ints(enc, ts, n, w, u, _H_TS, _ST_HEAD, 1)
    _encode_ints(enc, seqs, n, w, u, _H_SEQ, _ST_HEAD + _REC, 0)
    w[_H_WARM] = 1
    if recon is None:
        recon = array("d", bytes(8 * nf * n))
    _check_len("recon", recon, nf * n)
    want_q = 1
    if residuals is None:
        residuals = array("q", bytes(8))
        want_q = 0
    else:
        _check_len("residuals", residuals, nf * n)
    _encode_columns(
        enc,
        values,
        _words(values),
        n,
        tol_a,
        kind_a,
        alpha_a,
        beta_a,
        recon,
        _words(recon),
        residuals,
        want_q,
        w,
        u,
    )
    data = enc.finish()
    if state is not None:
        state[:] = work
    return data


def _encode_columns(
    enc, xs, xbits, n, tols, kinds, alphas, betas, recon, rbits, qout, want_q, w, u
):
    for j in range(len(tols)):
        _encode_column(
            enc,
            xs,
            xbits,
            j * n,
            n,
            tols[j],
            kinds[j],
            alphas[j],
            betas[j],
            recon,
            rbits,
            qout,
            want_q,
            w,
            u,
            _ST_HEAD + (j + 2) * _REC,
        )


def decode_block(
    data, n, first_ts, first_seq, tols, kinds, alphas, betas, ts, seqs, values, state=None
):
    """Decode a block coded by encode_block into preallocated buffers: ts and seqs of n int64
    values, values of nf * n float64 values (column-major, as encode_block takes them). With a
    warm state, first_ts and first_seq are ignored (they were coded in the block); on success
    the state is updated in place, as encode_block updates the encoder's."""
    tol_a, kind_a, alpha_a, beta_a = check_params(tols, kinds, alphas, betas)
    nf = len(tol_a)
    _check_len("ts", ts, n)
    _check_len("seqs", seqs, n)
    _check_len("values", values, nf * n)
    work = _take_state(state, nf)
    if n == 0:
        return
    w = memoryview(work).cast("q")
    u = memoryview(work).cast("I")
    if not w[_H_WARM]:
        if not (-_I_MAX < first_ts < _I_MAX and -_I_MAX < first_seq < _I_MAX):
            raise CodecError("first timestamp or sequence number out of range")
    else:  # coded in the block; whatever the caller passed is not even range-checked
        first_ts = 0
        first_seq = 0
    dec = Decoder(data, 0, len(data))
    _decode_ints(dec, ts, n, first_ts, w, u, _H_TS, _ST_HEAD, 1)
    _decode_ints(dec, seqs, n, first_seq, w, u, _H_SEQ, _ST_HEAD + _REC, 0)
    w[_H_WARM] = 1
    _decode_columns(dec, values, _words(values), n, tol_a, kind_a, alpha_a, beta_a, w, u)
    if dec.overrun or dec.pos != dec.end:
        raise CodecError("coded block length does not match its content")
    if state is not None:
        state[:] = work


def _decode_columns(dec, out, obits, n, tols, kinds, alphas, betas, w, u):
    for j in range(len(tols)):
        _decode_column(
            dec,
            out,
            obits,
            j * n,
            n,
            tols[j],
            kinds[j],
            alphas[j],
            betas[j],
            w,
            u,
            _ST_HEAD + (j + 2) * _REC,
        )


def _words(buf):
    """The same float64 buffer seen as unsigned 64-bit words."""
    return memoryview(buf).cast("B").cast("Q")


# ---------------------------------------------------------------------------------------------
# Rollup statistics: count, min, avg, max per field and time bucket, over finite values. The
# edge builds its rollups with this and the hub its own from decoded blocks, so both give the
# same bits: the sum is plain left-to-right double addition in row order from 0.0 (as
# CPython 3.11's sum), and min and max keep the first of equal values (0.0 and -0.0), as
# Python's min and max do.


def bucket_stats(ts, values, n, nf, bucket_ms):
    """Group n rows by bucket start ts // bucket_ms * bucket_ms (floor division) and return
    (starts, stats): the bucket starts ascending (array q) and, per bucket and per field in
    order, count, min, avg, max of the field's finite values (array d, 4 * nf per bucket);
    (0, MISSING, MISSING, MISSING) for a field with none. ts is an int64 buffer of n values
    (|ts| < 2**59, any order), values a float64 buffer of nf * n values, column-major."""
    if n < 0 or nf < 0:
        raise ValueError("row and field counts must be >= 0")
    _check_len("ts", ts, n)
    _check_len("values", values, nf * n)
    if not (1 <= bucket_ms <= 0x7FFF_FFFF_FFFF_FFFF):
        raise ValueError("bucket_ms must be in [1, 2**63 - 1], not %r" % bucket_ms)
    keys = array("q", bytes(8 * n))
    ids = array("q", bytes(8 * n))
    ordered = _bucket_keys(ts, n, bucket_ms, keys)
    if ordered < 0:
        raise ValueError("timestamp out of range at row %d" % (-1 - ordered))
    if ordered:
        nb = _run_ids(keys, n, ids)
        starts = array("q", bytes(8 * nb))
        _put_starts(keys, ids, n, starts)
    else:
        starts = array("q", sorted(set(keys)))
        nb = len(starts)
        _find_ids(keys, n, starts, nb, ids)
    stats = array("d", bytes(8 * 4 * nb * nf))
    _accumulate(values, ids, n, nf, stats, _words(stats))
    return starts, stats


def _bucket_keys(ts, n, b, keys):
    """Write each row's bucket start into keys; 1 if they never decrease, 0 if they do, and
    -1 - i if row i's timestamp is out of range."""
    ordered = 1
    last = 0
    for i in range(n):
        t = ts[i]
        if not (-_I_MAX < t < _I_MAX):
            return -1 - i
        k = t // b
        if k * b > t:  # C division truncates toward zero; Python's already floors
            k -= 1
        k = k * b
        keys[i] = k
        if i and k < last:
            ordered = 0
        last = k
    return ordered


def _run_ids(keys, n, ids):
    """Number the runs of equal keys (keys ascending); return how many there are."""
    nb = 0
    for i in range(n):
        if i and keys[i] != keys[i - 1]:
            nb += 1
        ids[i] = nb
    if n:
        nb += 1
    return nb


def _put_starts(keys, ids, n, starts):
    for i in range(n):
        starts[ids[i]] = keys[i]


def _find_ids(keys, n, starts, nb, ids):
    """Each row's bucket: the index of its key in the ascending distinct keys."""
    for i in range(n):
        k = keys[i]
        lo = 0
        hi = nb - 1
        while lo < hi:
            mid = (lo + hi) >> 1
            if starts[mid] < k:
                lo = mid + 1
            else:
                hi = mid
        ids[i] = lo


def _accumulate(xs, ids, n, nf, out, obits):
    """Fill out (zeroed: count 0, sum 0.0) with count, min, sum, max per bucket and field, in
    row order, then turn sums into averages and empty cells into MISSING."""
    for j in range(nf):
        base = j * n
        for i in range(n):
            x = xs[base + i]
            if not (abs(x) <= _DBL_MAX):  # NaN (missing too) and inf
                continue
            o = (ids[i] * nf + j) * 4
            c = out[o]
            if c == 0.0:
                out[o + 1] = x
                out[o + 3] = x
            else:
                if x < out[o + 1]:
                    out[o + 1] = x
                if x > out[o + 3]:
                    out[o + 3] = x
            out[o + 2] += x
            out[o] = c + 1.0
    for o in range(0, len(out), 4):
        c = out[o]
        if c == 0.0:
            obits[o + 1] = _MISSING_BITS
            obits[o + 2] = _MISSING_BITS
            obits[o + 3] = _MISSING_BITS
        else:
            out[o + 2] = out[o + 2] / c


def merge_stats(blob, nparts, nf):
    """Combine nparts stats blobs of nf fields each (as bucket_stats makes them: count, min,
    avg, max per field), concatenated in blob, into one: counts added, the smallest min and
    largest max of the parts that have values, averages weighted by count, in part order.
    Returns the merged blob (bytes of 4 * nf float64)."""
    if nparts < 0 or nf < 0:
        raise ValueError("part and field counts must be >= 0")
    if len(blob) != 32 * nparts * nf:
        raise ValueError("blob holds %d bytes, expected %d" % (len(blob), 32 * nparts * nf))
    src = array("d", bytes(blob))
    out = array("d", bytes(32 * nf))
    _merge(src, nparts, nf, out, _words(out))
    return out.tobytes()


def _merge(src, nparts, nf, out, obits):
    for j in range(nf):
        n = 0.0
        total = 0.0
        lo = 0.0
        hi = 0.0
        for b in range(nparts):
            k = (b * nf + j) * 4
            c = src[k]
            if c > 0.0:
                if n == 0.0:
                    lo = src[k + 1]
                    hi = src[k + 3]
                else:
                    if src[k + 1] < lo:
                        lo = src[k + 1]
                    if src[k + 3] > hi:
                        hi = src[k + 3]
                n += c
                total += src[k + 2] * c
        o = 4 * j
        if n > 0.0:
            out[o] = n
            out[o + 1] = lo
            out[o + 2] = total / n
            out[o + 3] = hi
        else:
            obits[o + 1] = _MISSING_BITS
            obits[o + 2] = _MISSING_BITS
            obits[o + 3] = _MISSING_BITS


# ---------------------------------------------------------------------------------------------
# Lossless packing of one frame's values, for the edge's history. Most device values are
# decimals with a few digits (scaled registers, JSON) or float32 registers, so a frame is
# stored as small integers with a common decimal scale, or as float32, whenever that gives
# back every value bit for bit (-0.0 aside); float64 otherwise. Header: kind, scale, 2 spare.

PACK_F64 = 0
PACK_F32 = 1
PACK_I16 = 2
PACK_I32 = 3
_PACK_HEADER = 4
_MAX_SCALE = 4
_I16_MISSING = -32768
_I32_MISSING = -2147483648
_F32_MISSING_BITS = 0x7FC0_6772  # a float32 NaN of our own for missing values


def _decimal_scale(xs, bits, n):
    """The smallest k <= _MAX_SCALE such that every finite value is r / 10**k for an integer
    |r| < 2**31 (missing values allowed, NaN and inf not); -1 if there is none."""
    k = 0
    p10 = 1.0
    while k <= _MAX_SCALE:
        ok = 1
        for i in range(n):
            if bits[i] == _MISSING_BITS:
                continue
            x = xs[i]
            if not (abs(x) * p10 < 2147483647.0):  # NaN and inf fail here too
                return -1
            r = floor_int(x * p10 + 0.5)
            if r / p10 != x:
                ok = 0
                break
        if ok:
            return k
        k += 1
        p10 *= 10.0
    return -1


def _fits_f32(xs, bits, n, f32):
    """Write xs as float32 into f32 and say whether every value survives the round trip."""
    for i in range(n):
        if bits[i] == _MISSING_BITS:
            continue
        x = xs[i]
        f32[i] = x
        if f32[i] != x and x == x:
            return 0
    return 1


def pack_values(xs):
    """Pack a float64 buffer (MISSING for missing values) losslessly into bytes."""
    n = len(xs)
    bits = _words(xs)
    k = _decimal_scale(xs, bits, n)
    if k >= 0:
        p10 = 10.0**k
        wide = 0
        for i in range(n):
            if bits[i] != _MISSING_BITS and abs(xs[i]) * p10 >= 32767.0:
                wide = 1
                break
        ints = array("q", bytes(8 * n))
        _put_ints(xs, bits, n, p10, ints, _I32_MISSING if wide else _I16_MISSING)
        head = bytes([PACK_I32 if wide else PACK_I16, k, 0, 0])
        return head + array("i" if wide else "h", ints).tobytes()
    out = bytearray(_PACK_HEADER + 4 * n)
    out[0] = PACK_F32
    f32 = memoryview(out)[_PACK_HEADER:].cast("f")
    if _fits_f32(xs, bits, n, f32):
        words = memoryview(out)[_PACK_HEADER:].cast("I")
        for i in range(n):
            if bits[i] == _MISSING_BITS:
                words[i] = _F32_MISSING_BITS
        return bytes(out)
    return bytes([PACK_F64, 0, 0, 0]) + memoryview(xs).cast("B").tobytes()


def _put_ints(xs, bits, n, p10, body, missing):
    for i in range(n):
        if bits[i] == _MISSING_BITS:
            body[i] = missing
        else:
            body[i] = floor_int(xs[i] * p10 + 0.5)


def unpack_values(blob):
    """The float64 values (MISSING for missing) that pack_values packed into blob."""
    if len(blob) < _PACK_HEADER:
        raise CodecError("packed values are too short")
    kind = blob[0]
    body = memoryview(blob)[_PACK_HEADER:]
    if kind == PACK_F64:
        if len(body) % 8:
            raise CodecError("packed float64 values have a ragged length")
        return array("d", body.tobytes())
    if kind == PACK_F32:
        if len(body) % 4:
            raise CodecError("packed float32 values have a ragged length")
        out = array("d", body.cast("f"))
        words = body.cast("I")
        for i in range(len(words)):
            if words[i] == _F32_MISSING_BITS:
                out[i] = MISSING
        return out
    if kind in (PACK_I16, PACK_I32):
        width = 2 if kind == PACK_I16 else 4
        if len(body) % width or blob[1] > _MAX_SCALE:
            raise CodecError("packed decimal values are malformed")
        ints = array("q", body.cast("h" if kind == PACK_I16 else "i"))
        missing = _I16_MISSING if kind == PACK_I16 else _I32_MISSING
        out = array("d", bytes(8 * len(ints)))
        _get_ints(ints, len(ints), 10.0 ** blob[1], missing, out)
        return out
    raise CodecError("unknown packing %d" % kind)


def _get_ints(ints, n, p10, missing, out):
    for i in range(n):
        r = ints[i]
        if r == missing:
            out[i] = MISSING
        else:
            out[i] = r / p10
