//! Differential tests: every scenario runs against a fresh real etcd (reference) and a fresh
//! candidate (fetcd with `--features fetcd`, otherwise a second etcd), the normalized
//! transcripts must be identical, and each scenario also asserts absolute facts about etcd's
//! behaviour so that it fails even if both servers are wrong in the same way.
#![allow(clippy::unwrap_used)]

use anyhow::{ensure, Result};
use etcd_client::{
    CompactionOptions, Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, PutOptions,
    ResponseHeader, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};
use fetcd_tests::observe::revision;
use fetcd_tests::{expect_grpc_error, run_differential, Session};

// Exact etcd 3.4 error messages (gRPC code in the comment / check).
const KEY_NOT_FOUND: &str = "etcdserver: key not found";
const EMPTY_KEY: &str = "etcdserver: key is not provided";
const VALUE_PROVIDED: &str = "etcdserver: value is provided";
const LEASE_PROVIDED: &str = "etcdserver: lease is provided";
const LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";
const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
const FUTURE_REV: &str = "etcdserver: mvcc: required revision is a future revision";
const DUPLICATE_KEY: &str = "etcdserver: duplicate key given in txn request";
const TOO_MANY_OPS: &str = "etcdserver: too many operations in txn request";
const TOO_LARGE: &str = "etcdserver: request is too large";

fn ensure_rev(h: Option<&ResponseHeader>, want: i64, what: &str) -> Result<()> {
    let got = revision(h);
    ensure!(got == want, "{what}: header.revision = {got}, want {want}");
    Ok(())
}

/// Checks (key, value, create_revision, mod_revision, version, lease).
fn ensure_kv(
    kv: &KeyValue,
    key: &str,
    value: &str,
    create: i64,
    modr: i64,
    version: i64,
    lease: i64,
) -> Result<()> {
    let got = (
        kv.key(),
        kv.value(),
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        kv.lease(),
    );
    let want = (
        key.as_bytes(),
        value.as_bytes(),
        create,
        modr,
        version,
        lease,
    );
    ensure!(got == want, "kv mismatch: got {got:?}, want {want:?}");
    Ok(())
}

fn keys(kvs: &[KeyValue]) -> Vec<String> {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Put
// ---------------------------------------------------------------------------------------------

async fn put_scenario(s: &mut Session) -> Result<()> {
    let r = s.get("get foo on fresh store", "foo", None).await?;
    ensure_rev(r.header(), 1, "fresh store")?;
    ensure!(r.count() == 0 && r.kvs().is_empty() && !r.more());

    let r = s.put("put foo=bar", "foo", "bar", None).await?;
    ensure_rev(r.header(), 2, "first write")?;
    ensure!(r.prev_key().is_none());

    let r = s.get("get foo", "foo", None).await?;
    ensure!(r.count() == 1);
    ensure_kv(&r.kvs()[0], "foo", "bar", 2, 2, 1, 0)?;

    let r = s
        .put(
            "overwrite foo=baz prev_kv",
            "foo",
            "baz",
            Some(PutOptions::new().with_prev_key()),
        )
        .await?;
    ensure_rev(r.header(), 3, "overwrite")?;
    ensure_kv(r.prev_key().unwrap(), "foo", "bar", 2, 2, 1, 0)?;

    let r = s.get("get foo after overwrite", "foo", None).await?;
    ensure_kv(&r.kvs()[0], "foo", "baz", 2, 3, 2, 0)?;

    let r = s
        .put("overwrite without prev_kv", "foo", "baz", None)
        .await?;
    ensure!(
        r.prev_key().is_none(),
        "prev_kv returned although not requested"
    );
    ensure_rev(r.header(), 4, "same-value overwrite still bumps")?;

    let r = s
        .put(
            "put foo ignore_value prev_kv",
            "foo",
            "",
            Some(PutOptions::new().with_ignore_value().with_prev_key()),
        )
        .await?;
    ensure_rev(r.header(), 5, "ignore_value put")?;
    let r = s.get("get foo after ignore_value", "foo", None).await?;
    ensure_kv(&r.kvs()[0], "foo", "baz", 2, 5, 4, 0)?;

    let r = s
        .put(
            "ignore_value on missing key",
            "missing",
            "",
            Some(PutOptions::new().with_ignore_value()),
        )
        .await;
    expect_grpc_error(&r, "InvalidArgument", KEY_NOT_FOUND)?;
    let r = s
        .put(
            "ignore_lease on missing key",
            "missing",
            "v",
            Some(PutOptions::new().with_ignore_lease()),
        )
        .await;
    expect_grpc_error(&r, "InvalidArgument", KEY_NOT_FOUND)?;
    let r = s
        .put(
            "ignore_value with a value",
            "foo",
            "x",
            Some(PutOptions::new().with_ignore_value()),
        )
        .await;
    expect_grpc_error(&r, "InvalidArgument", VALUE_PROVIDED)?;
    let r = s
        .put(
            "ignore_value with a value on missing key",
            "missing",
            "x",
            Some(PutOptions::new().with_ignore_value()),
        )
        .await;
    expect_grpc_error(&r, "InvalidArgument", VALUE_PROVIDED)?;
    let r = s
        .put(
            "put with non-existent lease",
            "foo",
            "v",
            Some(PutOptions::new().with_lease(0x1234)),
        )
        .await;
    expect_grpc_error(&r, "NotFound", LEASE_NOT_FOUND)?;
    let r = s.put("put empty key", "", "v", None).await;
    expect_grpc_error(&r, "InvalidArgument", EMPTY_KEY)?;
    let r = s
        .put(
            "put empty key ignore_value",
            "",
            "",
            Some(PutOptions::new().with_ignore_value()),
        )
        .await;
    expect_grpc_error(&r, "InvalidArgument", EMPTY_KEY)?;

    let r = s
        .get("errors did not bump the revision", "foo", None)
        .await?;
    ensure_rev(r.header(), 5, "after rejected puts")?;

    // ignore_value + ignore_lease on an existing key rewrites it unchanged at a new revision.
    // (Puts with real leases are covered with the Lease service.)
    s.put(
        "put foo ignore_value+ignore_lease",
        "foo",
        "",
        Some(PutOptions::new().with_ignore_value().with_ignore_lease()),
    )
    .await?;
    let r = s
        .get("foo after ignore_value+ignore_lease", "foo", None)
        .await?;
    ensure_rev(r.header(), 6, "ignore_value+ignore_lease put")?;
    // Checked on the request alone, before any lease lookup.
    let r = s
        .put(
            "ignore_lease together with a lease",
            "foo",
            "v",
            Some(PutOptions::new().with_ignore_lease().with_lease(0x1234)),
        )
        .await;
    expect_grpc_error(&r, "InvalidArgument", LEASE_PROVIDED)?;

    // Binary keys and values, empty value.
    s.put(
        "put binary key/value",
        vec![0xff, 0x00, 0x01],
        vec![0x00, 0xfe, 0xff],
        None,
    )
    .await?;
    s.put("put empty value", "empty", "", None).await?;
    let r = s.get("get empty value", "empty", None).await?;
    ensure!(r.kvs()[0].value().is_empty() && r.kvs()[0].version() == 1);
    s.put(
        "put key with spaces and unicode",
        "key with spaces/ü",
        "välue",
        None,
    )
    .await?;
    let r = s
        .put(
            "put new key with prev_kv",
            "fresh",
            "1",
            Some(PutOptions::new().with_prev_key()),
        )
        .await?;
    ensure!(r.prev_key().is_none());
    let r = s
        .get("final state", "", Some(GetOptions::new().with_all_keys()))
        .await?;
    ensure_rev(r.header(), 10, "final")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put() -> Result<()> {
    run_differential("put", put_scenario).await
}

// ---------------------------------------------------------------------------------------------
// Range
// ---------------------------------------------------------------------------------------------

/// Writes a key space with varied versions/create/mod revisions. Ends at revision 14.
async fn range_fixture(s: &mut Session) -> Result<()> {
    s.put("r2 a", "a", "1", None).await?;
    s.put("r3 ab", "ab", "2", None).await?;
    s.put("r4 abc", "abc", "3", None).await?;
    s.put("r5 b", "b", "4", None).await?;
    s.put("r6 a again", "a", "1v2", None).await?;
    s.put("r7 c", "c", "5", None).await?;
    s.put("r8 foo/1", "foo/1", "x", None).await?;
    s.put("r9 foo/2", "foo/2", "y", None).await?;
    s.put("r10 foo/1 again", "foo/1", "x2", None).await?;
    s.put("r11 zz", "zz", "0", None).await?;
    s.delete("r12 delete b", "b", None).await?;
    s.put("r13 b recreated", "b", "again", None).await?;
    let r = s
        .put("r14 binary key", vec![0xff, 0xfe], "bin", None)
        .await?;
    ensure_rev(r.header(), 14, "fixture")?;
    Ok(())
}

async fn range_scenario(s: &mut Session) -> Result<()> {
    range_fixture(s).await?;
    let all = || GetOptions::new().with_all_keys();

    let r = s.get("single key", "a", None).await?;
    ensure_kv(&r.kvs()[0], "a", "1v2", 2, 6, 2, 0)?;
    ensure!(r.count() == 1 && !r.more());
    let r = s.get("missing key", "nope", None).await?;
    ensure!(r.count() == 0 && r.kvs().is_empty());
    ensure_rev(r.header(), 14, "read header is the current revision")?;
    let r = s.get("empty key", "", None).await;
    expect_grpc_error(&r, "InvalidArgument", EMPTY_KEY)?;

    let r = s
        .get("prefix a", "a", Some(GetOptions::new().with_prefix()))
        .await?;
    ensure!(keys(r.kvs()) == ["a", "ab", "abc"]);
    s.get("prefix foo/", "foo/", Some(GetOptions::new().with_prefix()))
        .await?;
    s.get(
        "prefix 0xff (range_end \\0)",
        vec![0xff],
        Some(GetOptions::new().with_prefix()),
    )
    .await?;
    s.get(
        "prefix with no match",
        "q",
        Some(GetOptions::new().with_prefix()),
    )
    .await?;
    let r = s
        .get("from key b", "b", Some(GetOptions::new().with_from_key()))
        .await?;
    ensure!(r.count() == 6, "from-key count {}", r.count());
    let r = s.get("all keys", "", Some(all())).await?;
    ensure!(r.count() == 9 && r.kvs().len() == 9);
    ensure!(keys(r.kvs())[..8] == ["a", "ab", "abc", "b", "c", "foo/1", "foo/2", "zz"]);
    let r = s
        .get("range [a, b)", "a", Some(GetOptions::new().with_range("b")))
        .await?;
    ensure!(r.count() == 3);
    let r = s
        .get(
            "range [ab, c)",
            "ab",
            Some(GetOptions::new().with_range("c")),
        )
        .await?;
    ensure!(keys(r.kvs()) == ["ab", "abc", "b"]);
    let r = s
        .get(
            "range_end < key is empty",
            "c",
            Some(GetOptions::new().with_range("a")),
        )
        .await?;
    ensure!(r.count() == 0);
    s.get(
        "range_end == key is empty",
        "c",
        Some(GetOptions::new().with_range("c")),
    )
    .await?;

    // limit / more / count
    let r = s.get("limit 2", "", Some(all().with_limit(2))).await?;
    ensure!(r.kvs().len() == 2 && r.more() && r.count() == 9);
    let r = s
        .get("limit 9 (exact)", "", Some(all().with_limit(9)))
        .await?;
    ensure!(r.kvs().len() == 9 && !r.more());
    s.get("limit 100", "", Some(all().with_limit(100))).await?;
    s.get(
        "limit 1 prefix",
        "foo/",
        Some(GetOptions::new().with_prefix().with_limit(1)),
    )
    .await?;
    s.get("limit -1", "", Some(all().with_limit(-1))).await?;
    let r = s
        .get("count_only", "", Some(all().with_count_only()))
        .await?;
    ensure!(r.count() == 9 && r.kvs().is_empty());
    s.get(
        "count_only with limit",
        "",
        Some(all().with_count_only().with_limit(2)),
    )
    .await?;
    let r = s
        .get(
            "keys_only prefix a",
            "a",
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await?;
    ensure!(r.kvs().iter().all(|kv| kv.value().is_empty()) && r.kvs()[0].version() == 2);
    s.get(
        "keys_only + count_only",
        "",
        Some(all().with_keys_only().with_count_only()),
    )
    .await?;

    // historical reads
    let r = s
        .get("all at rev 5", "", Some(all().with_revision(5)))
        .await?;
    ensure!(keys(r.kvs()) == ["a", "ab", "abc", "b"]);
    ensure_kv(&r.kvs()[0], "a", "1", 2, 2, 1, 0)?;
    ensure_rev(
        r.header(),
        14,
        "historical read header is the current revision",
    )?;
    s.get(
        "b at rev 11 (before delete)",
        "b",
        Some(GetOptions::new().with_revision(11)),
    )
    .await?;
    let r = s
        .get(
            "b at rev 12 (deleted)",
            "b",
            Some(GetOptions::new().with_revision(12)),
        )
        .await?;
    ensure!(r.kvs().is_empty());
    s.get(
        "b at rev 13 (recreated)",
        "b",
        Some(GetOptions::new().with_revision(13)),
    )
    .await?;
    s.get("all at rev 1 (empty)", "", Some(all().with_revision(1)))
        .await?;
    s.get("all at rev 0 (= latest)", "", Some(all().with_revision(0)))
        .await?;
    s.get(
        "all at rev -1 (= latest)",
        "",
        Some(all().with_revision(-1)),
    )
    .await?;
    s.get("all at current rev 14", "", Some(all().with_revision(14)))
        .await?;
    s.get(
        "historical with limit",
        "",
        Some(all().with_revision(9).with_limit(2)),
    )
    .await?;
    s.get(
        "historical count_only",
        "",
        Some(all().with_revision(9).with_count_only()),
    )
    .await?;
    let r = s
        .get(
            "future rev 15",
            "a",
            Some(GetOptions::new().with_revision(15)),
        )
        .await;
    expect_grpc_error(&r, "OutOfRange", FUTURE_REV)?;
    let r = s
        .get("future rev 1000", "", Some(all().with_revision(1000)))
        .await;
    expect_grpc_error(&r, "OutOfRange", FUTURE_REV)?;

    // sorting
    let targets = [
        ("KEY", SortTarget::Key),
        ("VERSION", SortTarget::Version),
        ("CREATE", SortTarget::Create),
        ("MOD", SortTarget::Mod),
        ("VALUE", SortTarget::Value),
    ];
    let orders = [
        ("NONE", SortOrder::None),
        ("ASCEND", SortOrder::Ascend),
        ("DESCEND", SortOrder::Descend),
    ];
    for (tn, t) in targets {
        let mut by_order = Vec::new();
        for (on, o) in orders {
            let r = s
                .get(&format!("sort {tn} {on}"), "", Some(all().with_sort(t, o)))
                .await?;
            by_order.push(keys(r.kvs()));
        }
        // etcd quirk: a sort target other than KEY with order NONE sorts ascending.
        ensure!(by_order[0] == by_order[1], "sort {tn} NONE != ASCEND");
        s.get(
            &format!("sort {tn} DESCEND limit 3"),
            "",
            Some(all().with_sort(t, SortOrder::Descend).with_limit(3)),
        )
        .await?;
        s.get(
            &format!("sort {tn} ASCEND prefix a"),
            "a",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(t, SortOrder::Ascend),
            ),
        )
        .await?;
    }
    let r = s
        .get(
            "sort MOD DESCEND limit 2",
            "",
            Some(
                all()
                    .with_sort(SortTarget::Mod, SortOrder::Descend)
                    .with_limit(2),
            ),
        )
        .await?;
    ensure!(
        r.kvs().len() == 2 && r.kvs()[0].key() == [0xff, 0xfe] && r.kvs()[1].key() == b"b",
        "{:?}",
        keys(r.kvs())
    );
    // Sorting happens over the whole range before the limit is applied.
    ensure!(r.more() && r.count() == 9);
    let r = s
        .get(
            "sort KEY DESCEND",
            "",
            Some(all().with_sort(SortTarget::Key, SortOrder::Descend)),
        )
        .await?;
    ensure!(r.kvs()[0].key() == [0xff, 0xfe] && r.kvs()[8].key() == b"a");
    s.get(
        "sort VERSION DESCEND keys_only historical",
        "",
        Some(
            all()
                .with_sort(SortTarget::Version, SortOrder::Descend)
                .with_keys_only()
                .with_revision(10),
        ),
    )
    .await?;

    // mod/create revision filters
    let r = s
        .get(
            "min_mod_revision 9",
            "",
            Some(all().with_min_mod_revision(9)),
        )
        .await?;
    ensure!(r.kvs().iter().all(|kv| kv.mod_revision() >= 9) && r.kvs().len() == 5);
    // etcd quirk: `count` is the size of the whole range, not of the filtered result.
    ensure!(
        r.count() == 9 && !r.more(),
        "count {} more {}",
        r.count(),
        r.more()
    );
    s.get(
        "max_mod_revision 7",
        "",
        Some(all().with_max_mod_revision(7)),
    )
    .await?;
    s.get(
        "min_create_revision 8",
        "",
        Some(all().with_min_create_revision(8)),
    )
    .await?;
    s.get(
        "max_create_revision 4",
        "",
        Some(all().with_max_create_revision(4)),
    )
    .await?;
    s.get(
        "mod in [6, 10]",
        "",
        Some(all().with_min_mod_revision(6).with_max_mod_revision(10)),
    )
    .await?;
    s.get(
        "min_mod_revision 9 limit 1",
        "",
        Some(all().with_min_mod_revision(9).with_limit(1)),
    )
    .await?;
    s.get(
        "max_create_revision 4 count_only",
        "",
        Some(all().with_max_create_revision(4).with_count_only()),
    )
    .await?;
    s.get(
        "min_mod_revision 6 sort VALUE DESCEND limit 2",
        "",
        Some(
            all()
                .with_min_mod_revision(6)
                .with_sort(SortTarget::Value, SortOrder::Descend)
                .with_limit(2),
        ),
    )
    .await?;
    s.get(
        "min_mod_revision 100",
        "",
        Some(all().with_min_mod_revision(100)),
    )
    .await?;

    // serializable
    let r = s
        .get("serializable all", "", Some(all().with_serializable()))
        .await?;
    ensure!(r.count() == 9);
    s.get(
        "serializable single",
        "a",
        Some(GetOptions::new().with_serializable()),
    )
    .await?;
    s.get(
        "serializable historical",
        "",
        Some(all().with_serializable().with_revision(7)),
    )
    .await?;
    let r = s
        .get(
            "serializable future rev",
            "a",
            Some(GetOptions::new().with_serializable().with_revision(99)),
        )
        .await;
    expect_grpc_error(&r, "OutOfRange", FUTURE_REV)?;

    // compaction interaction
    let r = s.compact("compact at 6", 6, None).await?;
    ensure_rev(r.header(), 14, "compaction does not bump the revision")?;
    s.get(
        "all at rev 6 (= compact rev)",
        "",
        Some(all().with_revision(6)),
    )
    .await?;
    let r = s
        .get("all at rev 5 (compacted)", "", Some(all().with_revision(5)))
        .await;
    expect_grpc_error(&r, "OutOfRange", COMPACTED)?;
    let r = s
        .get(
            "a at rev 1 (compacted)",
            "a",
            Some(GetOptions::new().with_revision(1)),
        )
        .await;
    expect_grpc_error(&r, "OutOfRange", COMPACTED)?;
    s.get("all at rev 7", "", Some(all().with_revision(7)))
        .await?;
    s.get(
        "count_only at compact rev",
        "",
        Some(all().with_revision(6).with_count_only()),
    )
    .await?;
    let r = s
        .get(
            "serializable at compacted rev",
            "a",
            Some(GetOptions::new().with_serializable().with_revision(3)),
        )
        .await;
    expect_grpc_error(&r, "OutOfRange", COMPACTED)?;
    s.get("latest after compaction", "", Some(all())).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range() -> Result<()> {
    run_differential("range", range_scenario).await
}

/// More than 12 keys with equal sort fields: etcd uses Go's (unstable) sort.Sort.
/// Ties keep key order in both directions (etcd sorts DESCEND with a reversed comparator). Twelve
/// keys: up to that size Go's `sort.Sort` is a stable insertion sort; beyond it etcd's tie order
/// is whatever Go's pdqsort leaves, which fetcd deliberately does not reproduce (ties stay in
/// key order).
async fn sort_ties_scenario(s: &mut Session) -> Result<()> {
    for i in 0..12 {
        s.put(
            &format!("put t{i:02}"),
            format!("t{i:02}"),
            format!("{}", i % 3),
            None,
        )
        .await?;
    }
    s.put("bump t05", "t05", "1", None).await?;
    s.put("bump t10", "t10", "2", None).await?;
    let p = || GetOptions::new().with_prefix();
    for (tn, t) in [
        ("VERSION", SortTarget::Version),
        ("VALUE", SortTarget::Value),
        ("CREATE", SortTarget::Create),
        ("MOD", SortTarget::Mod),
    ] {
        for (on, o) in [
            ("ASCEND", SortOrder::Ascend),
            ("DESCEND", SortOrder::Descend),
        ] {
            s.get(
                &format!("ties: sort {tn} {on}"),
                "t",
                Some(p().with_sort(t, o).with_keys_only()),
            )
            .await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_sort_ties() -> Result<()> {
    run_differential("range_sort_ties", sort_ties_scenario).await
}

// ---------------------------------------------------------------------------------------------
// DeleteRange
// ---------------------------------------------------------------------------------------------

async fn delete_scenario(s: &mut Session) -> Result<()> {
    for (i, k) in ["a", "b", "c", "pfx/1", "pfx/2", "pfx/3", "z"]
        .iter()
        .enumerate()
    {
        s.put(&format!("put {k}"), *k, format!("v{i}"), None)
            .await?;
    }
    s.put("put b again", "b", "v1b", None).await?; // rev 9

    let r = s.delete("delete a", "a", None).await?;
    ensure!(r.deleted() == 1 && r.prev_kvs().is_empty());
    ensure_rev(r.header(), 10, "delete a")?;
    let r = s.delete("delete missing", "nope", None).await?;
    ensure!(r.deleted() == 0);
    ensure_rev(
        r.header(),
        10,
        "deleting nothing does not bump the revision",
    )?;
    let r = s
        .delete(
            "delete a again",
            "a",
            Some(DeleteOptions::new().with_prev_key()),
        )
        .await?;
    ensure!(r.deleted() == 0 && r.prev_kvs().is_empty());
    ensure_rev(
        r.header(),
        10,
        "deleting nothing does not bump the revision",
    )?;
    let r = s
        .delete(
            "delete missing prefix",
            "nothing/",
            Some(DeleteOptions::new().with_prefix()),
        )
        .await?;
    ensure_rev(r.header(), 10, "empty prefix delete")?;
    let r = s.delete("delete empty key", "", None).await;
    expect_grpc_error(&r, "InvalidArgument", EMPTY_KEY)?;

    let r = s
        .delete(
            "delete b prev_kv",
            "b",
            Some(DeleteOptions::new().with_prev_key()),
        )
        .await?;
    ensure!(r.deleted() == 1);
    ensure_kv(&r.prev_kvs()[0], "b", "v1b", 3, 9, 2, 0)?;
    ensure_rev(r.header(), 11, "delete b")?;

    let r = s
        .delete(
            "delete prefix pfx/ prev_kv",
            "pfx/",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        )
        .await?;
    ensure!(r.deleted() == 3 && r.prev_kvs().len() == 3);
    ensure_rev(r.header(), 12, "a multi-key delete is one revision")?;
    s.get(
        "all after prefix delete",
        "",
        Some(GetOptions::new().with_all_keys()),
    )
    .await?;
    s.get(
        "pfx/ at rev 11",
        "pfx/",
        Some(GetOptions::new().with_prefix().with_revision(11)),
    )
    .await?;

    s.put("put m", "m", "m", None).await?; // 13
    s.put("put n", "n", "n", None).await?; // 14
    let r = s
        .delete(
            "delete range [c, n)",
            "c",
            Some(DeleteOptions::new().with_range("n")),
        )
        .await?;
    ensure!(r.deleted() == 2, "deleted {}", r.deleted());
    let r = s
        .delete(
            "delete from key n",
            "n",
            Some(DeleteOptions::new().with_from_key().with_prev_key()),
        )
        .await?;
    ensure!(r.deleted() == 2);
    s.get(
        "all after from-key delete",
        "",
        Some(GetOptions::new().with_all_keys()),
    )
    .await?;

    // re-create deleted keys: version resets, new create_revision
    let r = s.put("re-put a", "a", "new", None).await?;
    ensure_rev(r.header(), 17, "re-put")?;
    let r = s.get("get re-put a", "a", None).await?;
    ensure_kv(&r.kvs()[0], "a", "new", 17, 17, 1, 0)?;
    let r = s
        .get(
            "a before deletion (rev 9)",
            "a",
            Some(GetOptions::new().with_revision(9)),
        )
        .await?;
    ensure_kv(&r.kvs()[0], "a", "v0", 2, 2, 1, 0)?;
    s.put("re-put pfx/2", "pfx/2", "again", None).await?;
    s.put("put x", "x", "x", None).await?;

    let r = s
        .delete(
            "delete all keys prev_kv",
            "",
            Some(DeleteOptions::new().with_all_keys().with_prev_key()),
        )
        .await?;
    ensure!(r.deleted() == 3, "deleted {}", r.deleted());
    ensure_rev(r.header(), 20, "delete all")?;
    let r = s
        .get("empty store", "", Some(GetOptions::new().with_all_keys()))
        .await?;
    ensure!(r.count() == 0);
    let r = s
        .delete(
            "delete all on empty store",
            "",
            Some(DeleteOptions::new().with_all_keys()),
        )
        .await?;
    ensure!(r.deleted() == 0);
    ensure_rev(r.header(), 20, "delete all on empty")?;
    s.get(
        "history at 19",
        "",
        Some(GetOptions::new().with_all_keys().with_revision(19)),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_range() -> Result<()> {
    run_differential("delete_range", delete_scenario).await
}

// ---------------------------------------------------------------------------------------------
// Txn
// ---------------------------------------------------------------------------------------------

fn op_put(k: &str, v: &str) -> TxnOp {
    TxnOp::put(k, v, None)
}

async fn txn_scenario(s: &mut Session) -> Result<()> {
    // LEASE compares against keys without a lease here; leased keys are covered with the Lease
    // service.
    let lease = 0x7777;
    s.put("put k1=v1", "k1", "v1", None).await?; // 2
    s.put("put k2=v2", "k2", "v2", None).await?; // 3
    s.put("put k1=v1b", "k1", "v1b", None).await?; // 4: k1 version 2, create 2, mod 4
    s.put("put kl", "kl", "l", None).await?; // 5

    // One compare per (target, op), each with a get of k1 in success and k2 in failure.
    let cases: Vec<(&str, Compare)> = vec![
        (
            "version(k1) = 2",
            Compare::version("k1", CompareOp::Equal, 2),
        ),
        (
            "version(k1) = 1",
            Compare::version("k1", CompareOp::Equal, 1),
        ),
        (
            "version(k1) != 1",
            Compare::version("k1", CompareOp::NotEqual, 1),
        ),
        (
            "version(k1) < 3",
            Compare::version("k1", CompareOp::Less, 3),
        ),
        (
            "version(k1) > 2",
            Compare::version("k1", CompareOp::Greater, 2),
        ),
        (
            "create(k1) = 2",
            Compare::create_revision("k1", CompareOp::Equal, 2),
        ),
        (
            "create(k1) > 1",
            Compare::create_revision("k1", CompareOp::Greater, 1),
        ),
        (
            "create(k1) < 2",
            Compare::create_revision("k1", CompareOp::Less, 2),
        ),
        (
            "create(k1) != 2",
            Compare::create_revision("k1", CompareOp::NotEqual, 2),
        ),
        (
            "mod(k1) = 4",
            Compare::mod_revision("k1", CompareOp::Equal, 4),
        ),
        (
            "mod(k1) < 4",
            Compare::mod_revision("k1", CompareOp::Less, 4),
        ),
        (
            "mod(k1) > 3",
            Compare::mod_revision("k1", CompareOp::Greater, 3),
        ),
        (
            "mod(k1) != 4",
            Compare::mod_revision("k1", CompareOp::NotEqual, 4),
        ),
        (
            "value(k1) = v1b",
            Compare::value("k1", CompareOp::Equal, "v1b"),
        ),
        (
            "value(k1) = v1",
            Compare::value("k1", CompareOp::Equal, "v1"),
        ),
        (
            "value(k1) != v1",
            Compare::value("k1", CompareOp::NotEqual, "v1"),
        ),
        (
            "value(k1) > v1",
            Compare::value("k1", CompareOp::Greater, "v1"),
        ),
        (
            "value(k1) < v1",
            Compare::value("k1", CompareOp::Less, "v1"),
        ),
        ("value(k1) < w", Compare::value("k1", CompareOp::Less, "w")),
        (
            "lease(kl) = lease",
            Compare::lease("kl", CompareOp::Equal, lease),
        ),
        (
            "lease(kl) != lease",
            Compare::lease("kl", CompareOp::NotEqual, lease),
        ),
        ("lease(kl) > 0", Compare::lease("kl", CompareOp::Greater, 0)),
        ("lease(kl) = 0", Compare::lease("kl", CompareOp::Equal, 0)),
        ("lease(k1) = 0", Compare::lease("k1", CompareOp::Equal, 0)),
        ("lease(k1) < 1", Compare::lease("k1", CompareOp::Less, 1)),
        (
            "missing: mod = 0",
            Compare::mod_revision("nope", CompareOp::Equal, 0),
        ),
        (
            "missing: version = 0",
            Compare::version("nope", CompareOp::Equal, 0),
        ),
        (
            "missing: create = 0",
            Compare::create_revision("nope", CompareOp::Equal, 0),
        ),
        (
            "missing: version > 0",
            Compare::version("nope", CompareOp::Greater, 0),
        ),
        (
            "missing: value = \"\"",
            Compare::value("nope", CompareOp::Equal, ""),
        ),
        (
            "missing: value != x",
            Compare::value("nope", CompareOp::NotEqual, "x"),
        ),
        (
            "missing: lease = 0",
            Compare::lease("nope", CompareOp::Equal, 0),
        ),
        (
            "range [k1, k3): version > 0",
            Compare::version("k1", CompareOp::Greater, 0).with_range("k3"),
        ),
        (
            "range [k1, k3): version = 1",
            Compare::version("k1", CompareOp::Equal, 1).with_range("k3"),
        ),
        (
            "range [k1, k3): mod < 5",
            Compare::mod_revision("k1", CompareOp::Less, 5).with_range("k3"),
        ),
        (
            "prefix k: create > 1",
            Compare::create_revision("k", CompareOp::Greater, 1).with_prefix(),
        ),
        (
            "prefix k: value != zzz",
            Compare::value("k", CompareOp::NotEqual, "zzz").with_prefix(),
        ),
        (
            "prefix none/: version = 0",
            Compare::version("none/", CompareOp::Equal, 0).with_prefix(),
        ),
        (
            "prefix none/: value = x",
            Compare::value("none/", CompareOp::Equal, "x").with_prefix(),
        ),
        (
            "from-key k2 (range_end \\0): version = 1",
            Compare::version("k2", CompareOp::Equal, 1).with_range(vec![0u8]),
        ),
    ];
    let mut outcomes = Vec::new();
    for (name, cmp) in cases {
        let r = s
            .txn(
                &format!("txn if {name}"),
                Txn::new()
                    .when([cmp])
                    .and_then([TxnOp::get("k1", None)])
                    .or_else([TxnOp::get("k2", None)]),
            )
            .await?;
        ensure_rev(r.header(), 5, "read-only txn does not bump the revision")?;
        outcomes.push((name, r.succeeded()));
    }
    let expect_true = |n: &str| outcomes.iter().any(|(name, ok)| *name == n && *ok);
    for n in [
        "version(k1) = 2",
        "version(k1) != 1",
        "mod(k1) = 4",
        "value(k1) = v1b",
        "value(k1) > v1",
        "lease(kl) != lease",
        "lease(kl) = 0",
        "missing: mod = 0",
        "missing: version = 0",
        "missing: create = 0",
        "missing: lease = 0",
    ] {
        ensure!(expect_true(n), "compare `{n}` should succeed");
    }
    for n in [
        "version(k1) = 1",
        "missing: value = \"\"",
        "missing: version > 0",
        "value(k1) < v1",
    ] {
        ensure!(!expect_true(n), "compare `{n}` should fail");
    }

    // Multiple compares: all must hold.
    s.txn(
        "txn two compares both true",
        Txn::new()
            .when([
                Compare::version("k1", CompareOp::Equal, 2),
                Compare::value("k2", CompareOp::Equal, "v2"),
            ])
            .and_then([TxnOp::get("k", Some(GetOptions::new().with_prefix()))]),
    )
    .await?;
    let r = s
        .txn(
            "txn two compares one false, no failure ops",
            Txn::new()
                .when([
                    Compare::version("k1", CompareOp::Equal, 2),
                    Compare::value("k2", CompareOp::Equal, "x"),
                ])
                .and_then([op_put("never", "1")]),
        )
        .await?;
    ensure!(!r.succeeded() && r.op_responses().is_empty());
    ensure_rev(r.header(), 5, "failed txn without ops")?;
    let r = s.txn("empty txn", Txn::new()).await?;
    ensure!(r.succeeded());
    ensure_rev(r.header(), 5, "empty txn")?;

    // Writes: one revision for the whole txn.
    let r = s
        .txn(
            "txn success: put k3, put k4, get k3, delete k2, get prefix k",
            Txn::new()
                .when([Compare::mod_revision("k3", CompareOp::Equal, 0)])
                .and_then([
                    op_put("k3", "v3"),
                    TxnOp::put("k4", "v4", Some(PutOptions::new().with_prev_key())),
                    TxnOp::get("k3", None),
                    TxnOp::delete("k2", Some(DeleteOptions::new().with_prev_key())),
                    TxnOp::get("k", Some(GetOptions::new().with_prefix())),
                ])
                .or_else([TxnOp::get("k3", None)]),
        )
        .await?;
    ensure!(r.succeeded());
    ensure_rev(r.header(), 6, "write txn is one revision")?;
    let ops = r.op_responses();
    ensure!(ops.len() == 5);
    if let TxnOpResponse::Get(g) = &ops[2] {
        ensure_kv(&g.kvs()[0], "k3", "v3", 6, 6, 1, 0)?;
    } else {
        anyhow::bail!("op 2 is not a range response");
    }
    let r = s
        .get(
            "after write txn",
            "k",
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    ensure!(r.kvs().iter().filter(|kv| kv.mod_revision() == 6).count() == 2);
    let r = s
        .txn(
            "same txn again takes failure branch",
            Txn::new()
                .when([Compare::mod_revision("k3", CompareOp::Equal, 0)])
                .and_then([op_put("k3", "v3")])
                .or_else([TxnOp::get("k3", None), op_put("k5", "v5")]),
        )
        .await?;
    ensure!(!r.succeeded());
    ensure_rev(r.header(), 7, "failure branch write")?;

    // Nested txn.
    s.txn(
        "nested txn",
        Txn::new()
            .when([Compare::version("k1", CompareOp::Greater, 0)])
            .and_then([
                op_put("outer", "1"),
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::value("k3", CompareOp::Equal, "v3")])
                        .and_then([op_put("inner", "1"), TxnOp::get("outer", None)])
                        .or_else([op_put("inner-failed", "1")]),
                ),
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::value("k3", CompareOp::Equal, "nope")])
                        .and_then([op_put("inner2", "1")])
                        .or_else([TxnOp::get("inner", None), TxnOp::delete("k5", None)]),
                ),
            ]),
    )
    .await?;
    let r = s
        .get(
            "after nested txn",
            "",
            Some(GetOptions::new().with_all_keys()),
        )
        .await?;
    ensure_rev(r.header(), 8, "nested txn is one revision")?;

    // Txn that deletes nothing: no revision bump.
    let r = s
        .txn(
            "txn deleting a missing key",
            Txn::new().and_then([TxnOp::delete("nope", None)]),
        )
        .await?;
    ensure_rev(r.header(), 8, "no-op write txn")?;

    // Duplicate keys.
    let r = s
        .txn(
            "same key put twice",
            Txn::new().and_then([op_put("d", "1"), op_put("d", "2")]),
        )
        .await;
    expect_grpc_error(&r, "InvalidArgument", DUPLICATE_KEY)?;
    let r = s
        .txn(
            "put + delete same key",
            Txn::new().and_then([op_put("d", "1"), TxnOp::delete("d", None)]),
        )
        .await;
    expect_grpc_error(&r, "InvalidArgument", DUPLICATE_KEY)?;
    let r = s
        .txn(
            "delete + put same key",
            Txn::new().and_then([TxnOp::delete("d", None), op_put("d", "1")]),
        )
        .await;
    expect_grpc_error(&r, "InvalidArgument", DUPLICATE_KEY)?;
    s.txn(
        "delete range overlapping a put",
        Txn::new().and_then([
            op_put("k1", "x"),
            TxnOp::delete("k", Some(DeleteOptions::new().with_prefix())),
        ]),
    )
    .await
    .ok();
    s.txn(
        "delete twice same key",
        Txn::new().and_then([TxnOp::delete("k1", None), TxnOp::delete("k1", None)]),
    )
    .await
    .ok();
    s.txn(
        "overlapping delete ranges",
        Txn::new().and_then([
            TxnOp::delete("k", Some(DeleteOptions::new().with_prefix())),
            TxnOp::delete("k1", None),
        ]),
    )
    .await
    .ok();
    s.txn(
        "put + get same key",
        Txn::new().and_then([op_put("k1", "pg"), TxnOp::get("k1", None)]),
    )
    .await?;
    s.txn(
        "same key in success and failure branches",
        Txn::new()
            .when([Compare::version("k1", CompareOp::Greater, 0)])
            .and_then([op_put("sf", "s")])
            .or_else([op_put("sf", "f")]),
    )
    .await?;
    s.txn(
        "put in outer and nested txn",
        Txn::new().and_then([
            op_put("nest", "1"),
            TxnOp::txn(Txn::new().and_then([op_put("nest", "2")])),
        ]),
    )
    .await
    .ok();
    s.txn(
        "put in two nested txns",
        Txn::new().and_then([
            TxnOp::txn(Txn::new().and_then([op_put("nest2", "1")])),
            TxnOp::txn(Txn::new().and_then([op_put("nest2", "2")])),
        ]),
    )
    .await
    .ok();
    s.txn(
        "put in nested success and failure",
        Txn::new().and_then([TxnOp::txn(
            Txn::new()
                .when([Compare::version("k1", CompareOp::Greater, 0)])
                .and_then([op_put("nest3", "1")])
                .or_else([op_put("nest3", "2")]),
        )]),
    )
    .await
    .ok();
    s.txn(
        "duplicate put in the untaken branch",
        Txn::new()
            .when([Compare::version("k1", CompareOp::Greater, 0)])
            .and_then([op_put("dup-untaken-ok", "1")])
            .or_else([op_put("dup", "1"), op_put("dup", "2")]),
    )
    .await
    .ok();

    // Invalid ops inside a txn reject the whole txn.
    let r = s
        .txn(
            "txn put ignore_value on missing key",
            Txn::new().and_then([
                op_put("valid", "1"),
                TxnOp::put("missing", "", Some(PutOptions::new().with_ignore_value())),
            ]),
        )
        .await;
    expect_grpc_error(&r, "InvalidArgument", KEY_NOT_FOUND)?;
    let r = s
        .txn(
            "txn put with missing lease",
            Txn::new().and_then([TxnOp::put("x", "1", Some(PutOptions::new().with_lease(42)))]),
        )
        .await;
    expect_grpc_error(&r, "NotFound", LEASE_NOT_FOUND)?;
    let r = s
        .txn("txn put empty key", Txn::new().and_then([op_put("", "1")]))
        .await;
    expect_grpc_error(&r, "InvalidArgument", EMPTY_KEY)?;
    s.txn(
        "txn get empty key",
        Txn::new().and_then([TxnOp::get("", None)]),
    )
    .await
    .ok();
    let r = s
        .txn(
            "txn get future revision",
            Txn::new().and_then([TxnOp::get(
                "k1",
                Some(GetOptions::new().with_revision(1000)),
            )]),
        )
        .await;
    expect_grpc_error(&r, "OutOfRange", FUTURE_REV)?;
    s.txn(
        "txn invalid op in the untaken branch",
        Txn::new()
            .when([Compare::version("k1", CompareOp::Greater, 0)])
            .and_then([TxnOp::get("k1", None)])
            .or_else([TxnOp::put(
                "missing",
                "",
                Some(PutOptions::new().with_ignore_value()),
            )]),
    )
    .await
    .ok();
    let r = s.get("invalid txns changed nothing", "valid", None).await?;
    ensure!(r.kvs().is_empty(), "a rejected txn applied a put");

    // Operation count limit (128).
    let ops128: Vec<TxnOp> = (0..128)
        .map(|i| op_put(&format!("many/{i:03}"), "x"))
        .collect();
    let before = revision(
        s.get("rev before 128-op txn", "many/", None)
            .await?
            .header(),
    );
    let r = s.txn("128 puts", Txn::new().and_then(ops128)).await?;
    ensure_rev(r.header(), before + 1, "128-op txn")?;
    let ops129: Vec<TxnOp> = (0..129)
        .map(|i| TxnOp::get(format!("many/{i:03}"), None))
        .collect();
    let r = s.txn("129 gets", Txn::new().and_then(ops129)).await;
    expect_grpc_error(&r, "InvalidArgument", TOO_MANY_OPS)?;
    let ops129: Vec<TxnOp> = (0..129)
        .map(|i| TxnOp::get(format!("many/{i:03}"), None))
        .collect();
    let r = s
        .txn(
            "129 failure ops",
            Txn::new()
                .when([Compare::version("k1", CompareOp::Greater, 0)])
                .or_else(ops129),
        )
        .await;
    expect_grpc_error(&r, "InvalidArgument", TOO_MANY_OPS)?;
    let cmps129: Vec<Compare> = (0..129)
        .map(|i| Compare::version(format!("many/{i:03}"), CompareOp::Equal, 1))
        .collect();
    let r = s.txn("129 compares", Txn::new().when(cmps129)).await;
    expect_grpc_error(&r, "InvalidArgument", TOO_MANY_OPS)?;
    let cmps128: Vec<Compare> = (0..128)
        .map(|i| Compare::version(format!("many/{i:03}"), CompareOp::Equal, 1))
        .collect();
    let ops128: Vec<TxnOp> = (0..128)
        .map(|i| {
            TxnOp::get(
                format!("many/{i:03}"),
                Some(GetOptions::new().with_count_only()),
            )
        })
        .collect();
    let r = s
        .txn(
            "128 compares + 128 gets",
            Txn::new().when(cmps128).and_then(ops128),
        )
        .await?;
    ensure!(r.succeeded());
    s.txn(
        "nested txn with 129 ops",
        Txn::new().and_then([TxnOp::txn(
            Txn::new().and_then(
                (0..129)
                    .map(|i| TxnOp::get(format!("many/{i:03}"), None))
                    .collect::<Vec<_>>(),
            ),
        )]),
    )
    .await
    .ok();
    s.get(
        "final",
        "",
        Some(GetOptions::new().with_all_keys().with_keys_only()),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn() -> Result<()> {
    run_differential("txn", txn_scenario).await
}

// ---------------------------------------------------------------------------------------------
// Compaction
// ---------------------------------------------------------------------------------------------

async fn compact_scenario(s: &mut Session) -> Result<()> {
    let r = s
        .compact("compact future rev on fresh store", 5, None)
        .await;
    expect_grpc_error(&r, "OutOfRange", FUTURE_REV)?;
    s.compact("compact rev 0 on fresh store", 0, None)
        .await
        .ok();
    s.compact("compact rev 1 on fresh store", 1, None)
        .await
        .ok();
    let r = s
        .compact("compact rev 1 again on fresh store", 1, None)
        .await;
    expect_grpc_error(&r, "OutOfRange", COMPACTED)?;
    s.get(
        "read after compacting fresh store",
        "",
        Some(GetOptions::new().with_all_keys()),
    )
    .await?;

    for i in 2..=10 {
        s.put(&format!("put k={i}"), "k", format!("v{i}"), None)
            .await?;
    }
    s.put("put other", "other", "o", None).await?; // 11
    s.delete("delete other", "other", None).await?; // 12
    s.put("put gone", "gone", "g", None).await?; // 13
    s.delete("delete gone", "gone", None).await?; // 14

    let r = s.compact("compact 5", 5, None).await?;
    ensure_rev(r.header(), 14, "compaction keeps the revision")?;
    let r = s
        .get(
            "k at 4 (compacted)",
            "k",
            Some(GetOptions::new().with_revision(4)),
        )
        .await;
    expect_grpc_error(&r, "OutOfRange", COMPACTED)?;
    let r = s
        .get(
            "k at 5 (compact rev)",
            "k",
            Some(GetOptions::new().with_revision(5)),
        )
        .await?;
    ensure_kv(&r.kvs()[0], "k", "v5", 2, 5, 4, 0)?;
    s.get("k at 6", "k", Some(GetOptions::new().with_revision(6)))
        .await?;
    s.get("k latest", "k", None).await?;
    s.get(
        "other at 11",
        "other",
        Some(GetOptions::new().with_revision(11)),
    )
    .await?;
    s.get(
        "all at 12",
        "",
        Some(GetOptions::new().with_all_keys().with_revision(12)),
    )
    .await?;

    let r = s.compact("compact 5 again", 5, None).await;
    expect_grpc_error(&r, "OutOfRange", COMPACTED)?;
    let r = s.compact("compact 3 (below)", 3, None).await;
    expect_grpc_error(&r, "OutOfRange", COMPACTED)?;
    let r = s.compact("compact 0 after compaction", 0, None).await;
    ensure!(r.is_err(), "compact 0 after compacting 5 should fail");
    let r = s.compact("compact 15 (future)", 15, None).await;
    expect_grpc_error(&r, "OutOfRange", FUTURE_REV)?;
    let r = s.compact("compact 1000 (future)", 1000, None).await;
    expect_grpc_error(&r, "OutOfRange", FUTURE_REV)?;

    // Compacting past a deletion removes the key's history at and below the compact revision.
    s.compact(
        "compact 12 (other deleted at 12)",
        12,
        Some(CompactionOptions::new().with_physical()),
    )
    .await?;
    let r = s
        .get(
            "other at 12 after compaction",
            "other",
            Some(GetOptions::new().with_revision(12)),
        )
        .await?;
    ensure!(r.kvs().is_empty());
    let r = s
        .get(
            "k at 11 (compacted)",
            "k",
            Some(GetOptions::new().with_revision(11)),
        )
        .await;
    expect_grpc_error(&r, "OutOfRange", COMPACTED)?;
    s.get("k at 12", "k", Some(GetOptions::new().with_revision(12)))
        .await?;
    s.get(
        "gone at 13",
        "gone",
        Some(GetOptions::new().with_revision(13)),
    )
    .await?;

    // Compact to the current revision (physical).
    let r = s
        .compact(
            "compact 14 = current, physical",
            14,
            Some(CompactionOptions::new().with_physical()),
        )
        .await?;
    ensure_rev(r.header(), 14, "physical compaction")?;
    s.get(
        "all at 14",
        "",
        Some(GetOptions::new().with_all_keys().with_revision(14)),
    )
    .await?;
    let r = s
        .get(
            "all at 13 (compacted)",
            "",
            Some(GetOptions::new().with_all_keys().with_revision(13)),
        )
        .await;
    expect_grpc_error(&r, "OutOfRange", COMPACTED)?;
    let r = s.get("k after full compaction", "k", None).await?;
    ensure_kv(&r.kvs()[0], "k", "v10", 2, 10, 9, 0)?;
    let r = s
        .txn(
            "txn get at compacted rev",
            Txn::new().and_then([TxnOp::get("k", Some(GetOptions::new().with_revision(3)))]),
        )
        .await;
    expect_grpc_error(&r, "OutOfRange", COMPACTED)?;

    // Writes continue normally; versions survive compaction.
    let r = s.put("put k after compaction", "k", "v15", None).await?;
    ensure_rev(r.header(), 15, "write after compaction")?;
    let r = s.get("k version continues", "k", None).await?;
    ensure_kv(&r.kvs()[0], "k", "v15", 2, 15, 10, 0)?;
    s.put("re-create other", "other", "o2", None).await?;
    s.get("other recreated", "other", None).await?;
    s.compact("compact 15", 15, None).await?;
    s.get(
        "all at 15",
        "",
        Some(GetOptions::new().with_all_keys().with_revision(15)),
    )
    .await?;
    s.get(
        "all at 16",
        "",
        Some(GetOptions::new().with_all_keys().with_revision(16)),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction() -> Result<()> {
    run_differential("compaction", compact_scenario).await
}

// ---------------------------------------------------------------------------------------------
// Large requests
// ---------------------------------------------------------------------------------------------

const MIB: usize = 1024 * 1024;

async fn large_scenario(s: &mut Session) -> Result<()> {
    let one_mib = vec![b'a'; MIB];
    let r = s.put("put 1 MiB", "big", one_mib.clone(), None).await?;
    ensure_rev(r.header(), 2, "1 MiB put")?;
    let r = s.get("get 1 MiB", "big", None).await?;
    ensure!(r.kvs()[0].value() == one_mib.as_slice());

    // etcd checks the marshaled raft request (value + ~24 bytes of framing + key) against
    // --max-request-bytes (default 1.5 MiB = 1572864).
    let under = vec![b'u'; MIB + MIB / 2 - 64];
    s.put("put 1.5 MiB - 64 bytes", "under", under, None)
        .await?;

    let over = vec![b'o'; MIB + MIB / 2 + 1];
    let r = s.put("put 1.5 MiB + 1", "over", over, None).await;
    expect_grpc_error(&r, "InvalidArgument", TOO_LARGE)?;
    let r = s
        .put(
            "put 2 MiB - 1 KiB",
            "over",
            vec![b'o'; 2 * MIB - 1024],
            None,
        )
        .await;
    expect_grpc_error(&r, "InvalidArgument", TOO_LARGE)?;
    let r = s
        .put("put 2.5 MiB", "over", vec![b'o'; 2 * MIB + MIB / 2], None)
        .await;
    let (code, _) = fetcd_tests::grpc_error(&r).unwrap_or_default();
    ensure!(
        code == "ResourceExhausted",
        "2.5 MiB put: {:?}",
        fetcd_tests::grpc_error(&r)
    );
    let r = s.get("rejected puts did not apply", "over", None).await?;
    ensure!(r.kvs().is_empty());
    ensure_rev(r.header(), 3, "after rejected large puts")?;

    // A txn whose ops together exceed the limit.
    let r = s
        .txn(
            "txn 2 x 1 MiB",
            Txn::new().and_then([
                TxnOp::put("t1", vec![b'1'; MIB], None),
                TxnOp::put("t2", vec![b'2'; MIB], None),
            ]),
        )
        .await;
    ensure!(r.is_err(), "2 MiB txn accepted");
    // A read whose response is larger than the request limit is fine.
    s.put("put another 1 MiB", "big2", one_mib, None).await?;
    let r = s
        .get(
            "get 3.5 MiB range",
            "",
            Some(GetOptions::new().with_all_keys()),
        )
        .await?;
    ensure!(r.count() == 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests() -> Result<()> {
    run_differential("large_requests", large_scenario).await
}
