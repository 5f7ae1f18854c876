//! The tokio module's unit tests: the bounded pause, the threads' masks.

use super::*;
use std::future::Future;

#[test]
fn pause_collects_every_task_and_resume_lets_new_ones_run() {
    let rt = runtime().unwrap();
    rt.block_on(async {
        let q: Quiesce<u32> = Quiesce::new();
        let mut handles = Vec::new();
        for i in 0..50u32 {
            let sp = q.join();
            handles.push(::tokio::spawn(async move {
                if i % 10 == 0 {
                    // A connection that ends before the pause.
                    return;
                }
                sp.requested().await;
                sp.park(i);
            }));
        }
        let mut got = q.pause().await.unwrap();
        got.sort_unstable();
        assert_eq!(got, (0..50).filter(|i| i % 10 != 0).collect::<Vec<_>>());
        assert_eq!(q.running(), 0);
        // One that joins during a pause is asked at once.
        let late = q.join();
        assert!(late.is_requested());
        late.requested().await;
        late.park(99);
        assert_eq!(q.pause().await.unwrap(), [99]);
        q.resume();
        let sp = q.join();
        assert!(!sp.is_requested());
        drop(sp);
        for h in handles {
            h.await.unwrap();
        }
    });
}

#[test]
fn a_task_that_never_reaches_its_safe_point_ends_the_pause_not_the_server() {
    let rt = runtime().unwrap();
    rt.block_on(async {
        // The stuck task never parks before it is let go: the limit
        // only bounds how long this test waits.
        let q: Quiesce<u32> = Quiesce::with_limit(Duration::from_secs(2));
        // A task stuck outside its safe point (a write to a client that
        // does not read), until it is let go.
        let (go, stuck_until) = ::tokio::sync::oneshot::channel::<()>();
        let stuck = q.join_as("10.0.0.9:4000");
        let stuck_task = ::tokio::spawn(async move {
            let _ = stuck_until.await;
            stuck.requested().await;
            stuck.park(9);
        });
        let mut quick = Vec::new();
        for i in 0..5u32 {
            let sp = q.join();
            quick.push(::tokio::spawn(async move {
                sp.requested().await;
                sp.park(i);
            }));
        }
        let unpaused = q.pause().await.unwrap_err();
        let mut parked = unpaused.parked.clone();
        parked.sort_unstable();
        assert_eq!(parked, [0, 1, 2, 3, 4]);
        assert_eq!(unpaused.running, ["10.0.0.9:4000"]);
        assert!(unpaused.to_string().contains("10.0.0.9:4000"), "{unpaused}");
        // The stuck task is not asked to stop any more: once let go, it
        // runs on, and parks only at the next pause.
        assert!(!q.join().is_requested());
        go.send(()).unwrap();
        ::tokio::task::yield_now().await;
        assert_eq!(q.running(), 1);
        assert_eq!(q.pause().await.unwrap(), [9]);
        stuck_task.await.unwrap();
        for h in quick {
            h.await.unwrap();
        }
    });
}

#[test]
fn tasks_that_hold_go_on_from_where_they_were_when_the_pause_ends() {
    let rt = runtime().unwrap();
    rt.block_on(async {
        let q: Quiesce<u32> = Quiesce::with_limit(Duration::from_secs(5));
        let (went_on, mut released) = ::tokio::sync::mpsc::unbounded_channel();
        for i in 0..20u32 {
            let sp = q.join();
            let went_on = went_on.clone();
            ::tokio::spawn(async move {
                // Two pauses, each held in place with a copy of the count;
                // the task says when it goes on.
                let mut count = i;
                for _ in 0..2 {
                    sp.requested().await;
                    sp.hold(|| Some(count)).await;
                    went_on.send(count).unwrap();
                    count += 100;
                }
            });
        }
        drop(went_on);
        let mut released_by = |n| {
            let mut got = Vec::new();
            for _ in 0..n {
                got.push(released.try_recv().ok());
            }
            got
        };
        let mut first = q.pause().await.unwrap();
        first.sort_unstable();
        assert_eq!(first, (0..20).collect::<Vec<_>>());
        // Held, not gone: until the pause ends, nobody went on.
        ::tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(released_by(1), [None]);
        q.resume();
        let mut second = q.pause().await.unwrap();
        second.sort_unstable();
        assert_eq!(second, (100..120).collect::<Vec<_>>());
        q.resume();
        let mut all = Vec::new();
        while let Some(n) = released.recv().await {
            all.push(n);
        }
        all.sort_unstable();
        let want: Vec<u32> = (0..20).chain(100..120).collect();
        assert_eq!(all, want);
        assert_eq!(q.running(), 0);
    });
}

#[test]
fn a_copy_is_made_only_once_every_task_has_stopped() {
    let rt = runtime().unwrap();
    rt.block_on(async {
        let q: Quiesce<usize> = Quiesce::with_limit(Duration::from_secs(5));
        let inbox = Arc::new(Mutex::new(Vec::<u32>::new()));
        let (holding, about_to_hold) = ::tokio::sync::oneshot::channel::<()>();
        let ann = q.join();
        let ann_inbox = Arc::clone(&inbox);
        ::tokio::spawn(async move {
            ann.requested().await;
            holding.send(()).unwrap();
            ann.hold(|| Some(ann_inbox.lock().unwrap().len())).await;
        });
        let bob = q.join();
        let bob_writes_to = Arc::clone(&inbox);
        ::tokio::spawn(async move {
            // Still running while ann holds: five messages to her inbox,
            // then bob stops too.
            about_to_hold.await.unwrap();
            ::tokio::time::sleep(Duration::from_millis(20)).await;
            bob_writes_to.lock().unwrap().extend(1..=5);
            bob.requested().await;
            bob.hold(|| Some(99)).await;
        });
        let mut copies = q.pause().await.unwrap();
        copies.sort_unstable();
        // Ann's copy holds bob's five messages: it was made after he
        // stopped.
        assert_eq!(copies, [5, 99]);
        q.resume();
    });
}

#[test]
fn a_task_granted_its_safe_point_after_the_limit_goes_on_and_holds_next_time() {
    let rt = runtime().unwrap();
    rt.block_on(async {
        let limit = Duration::from_millis(100);
        let q: Quiesce<u32> = Quiesce::with_limit(limit);
        let late = q.join_as("late");
        ::tokio::spawn(async move {
            // Granted at once, but holds only after the limit passed.
            late.requested().await;
            ::tokio::time::sleep(limit * 3 / 2).await;
            late.hold(|| Some(1)).await;
            // The pause had ended: it went on; the next pause gets it.
            late.requested().await;
            late.hold(|| Some(2)).await;
        });
        let unpaused = q.pause().await.unwrap_err();
        assert!(unpaused.parked.is_empty());
        assert_eq!(unpaused.running, ["late"]);
        assert_eq!(q.pause().await.unwrap(), [2]);
        q.resume();
    });
}

#[test]
fn a_pause_that_ends_unpaused_lets_the_held_tasks_go_on() {
    let rt = runtime().unwrap();
    rt.block_on(async {
        // The limit leaves the holding task ample time to hold (the stuck
        // one never does: the pause always lasts the limit).
        let q: Quiesce<u32> = Quiesce::with_limit(Duration::from_secs(1));
        let stuck = q.join_as("stuck");
        let holder = q.join();
        let (went_on, mut gone) = ::tokio::sync::oneshot::channel();
        ::tokio::spawn(async move {
            holder.requested().await;
            holder.hold(|| Some(7)).await;
            went_on.send(()).unwrap();
        });
        let unpaused = q.pause().await.unwrap_err();
        // The pause never sealed (the stuck task runs): no copy was made.
        assert!(unpaused.parked.is_empty());
        assert_eq!(unpaused.running, ["stuck"]);
        // The pause ended at its limit: the holding task goes on by itself.
        (&mut gone).await.unwrap();
        drop(stuck);
    });
}

/// Spawns, in `q`, an idle task (its copy: 1) and a busy one (2), and
/// returns once the idle task asked for its safe point, three times
/// [`BUSY`] ago: it is idle to the next pause. The receiver gets how many
/// tasks of `q` still ran when the busy one was granted its safe point.
async fn idle_and_busy(q: &Quiesce<u32>) -> ::tokio::sync::oneshot::Receiver<usize> {
    let idle = q.join_as("idle");
    let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let asked = Polls {
        inner: Box::pin(async move {
            idle.requested().await;
            idle
        }),
        count: Arc::clone(&polls),
    };
    ::tokio::spawn(async move {
        let idle = asked.await;
        // Slow to hold: a busy task asked at the same time would be
        // granted before this one stopped.
        ::tokio::time::sleep(Duration::from_millis(50)).await;
        idle.hold(|| Some(1)).await;
    });
    let busy = q.join_as("busy");
    let q = q.clone();
    let (granted, running_then) = ::tokio::sync::oneshot::channel();
    ::tokio::spawn(async move {
        // Serves a client every millisecond until asked to stop.
        loop {
            ::tokio::select! {
                () = busy.requested() => break,
                () = ::tokio::time::sleep(Duration::from_millis(1)) => {}
            }
        }
        let _ = granted.send(q.running());
        busy.hold(|| Some(2)).await;
    });
    for _ in 0..5000 {
        if polls.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            break;
        }
        ::tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        polls.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the idle task never asked"
    );
    ::tokio::time::sleep(BUSY * 3).await;
    running_then
}

#[test]
fn a_busy_task_is_asked_once_the_idle_ones_stopped_and_its_copy_comes_first() {
    let rt = runtime().unwrap();
    rt.block_on(async {
        let q: Quiesce<u32> = Quiesce::with_limit(Duration::from_secs(5));
        let running_then = idle_and_busy(&q).await;
        let copies = q.pause().await.unwrap();
        // Only the busy task itself still ran when it was granted.
        assert_eq!(running_then.await.unwrap(), 1);
        assert_eq!(copies, [2, 1]);
        q.resume();
    });
}

#[test]
fn a_task_that_asks_after_an_idle_pause_sealed_is_granted_at_once() {
    let rt = runtime().unwrap();
    rt.block_on(async {
        let q: Quiesce<u32> = Quiesce::with_limit(Duration::from_secs(5));
        let idle = q.join();
        ::tokio::spawn(async move {
            idle.requested().await;
            idle.hold(|| Some(1)).await;
        });
        ::tokio::time::sleep(BUSY * 3).await;
        assert_eq!(q.pause().await.unwrap(), [1]);
        // Joins while the pause still grants (before `resume`): it asks
        // now, so it is busy, and no idle task is left to wait for.
        let late = q.join();
        ::tokio::time::timeout(Duration::from_secs(5), late.requested())
            .await
            .expect("a task asking after the pause sealed was left waiting");
        late.park(2);
        assert_eq!(q.pause().await.unwrap(), [2]);
        q.resume();
    });
}

/// Runs `test` on a single-threaded runtime of its own thread, and fails if
/// it has not finished within a minute: a task that spins there (polls
/// itself again without yielding) or a pause left waiting for its hour's
/// limit never lets it finish.
fn on_one_thread<R: Send + 'static>(test: impl Future<Output = R> + Send + 'static) -> R {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = ::tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _ = done.send(rt.block_on(test));
    });
    finished
        .recv_timeout(Duration::from_secs(60))
        .expect("the pause hung: a task spinning, or a step waiting for the limit")
}

#[test]
fn on_one_thread_the_busy_wait_without_spinning_and_are_asked_once_the_idle_stopped() {
    let copies = on_one_thread(async {
        // An hour's limit: only the idle task's stop can start the second
        // step (the quarter-limit would be a quarter of an hour).
        let q: Quiesce<u32> = Quiesce::with_limit(Duration::from_secs(3600));
        let running_then = idle_and_busy(&q).await;
        let copies = q.pause().await.unwrap();
        assert_eq!(running_then.await.unwrap(), 1);
        q.resume();
        copies
    });
    assert_eq!(copies, [2, 1]);
}

/// A future that counts how often it is polled: one that spins is polled
/// again and again (tokio's budget makes it yield every so often, not wait).
struct Polls<F> {
    inner: std::pin::Pin<Box<F>>,
    count: Arc<std::sync::atomic::AtomicUsize>,
}

impl<F: Future> Future for Polls<F> {
    type Output = F::Output;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.as_mut().poll(cx)
    }
}

#[test]
fn a_task_deferred_in_a_pause_that_was_given_up_waits_and_is_asked_by_the_next() {
    let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&polls);
    let copies = on_one_thread(async move {
        let q: Quiesce<u32> = Quiesce::with_limit(Duration::from_secs(3600));
        // Never asks: the first pause stays in its first step.
        let stuck = q.join_as("stuck");
        let busy = q.join();
        let (go, gone) = ::tokio::sync::oneshot::channel::<()>();
        ::tokio::spawn(async move {
            // A call that waits with no pause on, until told to go on.
            let waiting = Polls {
                inner: Box::pin(busy.requested()),
                count: Arc::clone(&counted),
            };
            ::tokio::select! {
                () = waiting => unreachable!("no pause was asked for"),
                _ = gone => {}
            }
            // Then one call, deferred in the first pause (the task just
            // asked: busy), answered in the next.
            let asked = Polls {
                inner: Box::pin(busy.requested()),
                count: counted,
            };
            asked.await;
            busy.hold(|| Some(2)).await;
        });
        ::tokio::task::yield_now().await;
        ::tokio::time::sleep(Duration::from_millis(50)).await;
        go.send(()).unwrap();
        ::tokio::task::yield_now().await;
        let first = ::tokio::time::timeout(Duration::from_millis(100), q.pause()).await;
        assert!(first.is_err(), "the first pause cannot finish: {first:?}");
        drop(stuck);
        let copies = q.pause().await.unwrap();
        q.resume();
        copies
    });
    assert_eq!(copies, [2]);
    // Each call polled when made, the second once per change of the pause
    // (the first starts, is given up; the next starts): it never spun.
    let polls = polls.load(std::sync::atomic::Ordering::Relaxed);
    assert!(polls <= 8, "the waiting task was polled {polls} times");
}

#[test]
fn runtime_threads_block_the_held_signals() {
    let rt = runtime().unwrap();
    let masks = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(
                ::tokio::task::spawn_blocking(|| {
                    crate::signal::HELD_SIGNALS
                        .iter()
                        .all(|s| crate::sys::is_blocked(*s))
                })
                .await
                .unwrap(),
            );
        }
        v
    });
    assert!(masks.iter().all(|m| *m));
    assert!(
        !crate::sys::is_blocked(libc::SIGHUP),
        "building the runtime left this thread's mask as it was"
    );
}
