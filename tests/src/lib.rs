//! `airlock-e2e`: black-box tests of the real binary against mock upstreams (in progress).
