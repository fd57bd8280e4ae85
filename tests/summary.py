#!/usr/bin/python3
"""Count test results over every suite and print one line: N passed, M failed.

Reads JUnit XML files (cmocka's and pytest's) from a directory, and checks a
sanitizer log directory: any ASan/UBSan/LSan report there is one failure,
named with its file, because a sanitizer finding in a child process would
otherwise show only as a restarted proxy.

    summary.py JUNIT_DIR SANITIZER_DIR [LOG_DIR]

LOG_DIR is searched for logs (*.stderr, *.log) that carry a sanitizer report
written to stderr by a process that could not open a report file.
"""
import glob
import os
import sys
import xml.etree.ElementTree as ET


def record_fuzz(xml_path, log_path, rc):
    """One JUnit case per harness from tests/fuzz/run's closing lines."""
    import re
    cases = []
    with open(log_path, errors="replace") as f:
        for line in f:
            m = re.match(r"^(fuzz_[a-z0-9_]+): (\d+) execs in (\d+) s, (\d+) crash", line)
            if m:
                cases.append((m.group(1), int(m.group(4)), line.strip()))
    root = ET.Element("testsuite", name="fuzz")
    for name, crashes, line in cases:
        tc = ET.SubElement(root, "testcase", classname="fuzz", name=name)
        if crashes:
            ET.SubElement(tc, "failure", message=line)
    if not cases or (rc != 0 and not any(c for _, c, _ in cases)):
        tc = ET.SubElement(root, "testcase", classname="fuzz", name="run")
        ET.SubElement(tc, "failure", message="tests/fuzz/run exited %s" % rc)
    ET.ElementTree(root).write(xml_path)
    return 0


def main():
    if sys.argv[1] == "--record-fuzz":
        return record_fuzz(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    junit_dir, san_dir = sys.argv[1], sys.argv[2]
    passed = failed = skipped = 0
    files = sorted(glob.glob(os.path.join(junit_dir, "*.xml")))
    for path in files:
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as e:
            print("unreadable results %s: %s" % (path, e))
            failed += 1
            continue
        for case in root.iter("testcase"):
            name = "%s::%s" % (case.get("classname", ""), case.get("name", ""))
            if case.find("failure") is not None or case.find("error") is not None:
                failed += 1
                print("FAILED %s (%s)" % (name, os.path.basename(path)))
            elif case.find("skipped") is not None:
                skipped += 1
            else:
                passed += 1
    unit = [f for f in files if os.path.basename(f).startswith("unit-")]
    if not unit:
        print("no unit test results were written")
        failed += 1
    if not any(os.path.basename(f).startswith("integration") for f in files):
        print("no integration test results were written")
        failed += 1
    reports = sorted(glob.glob(os.path.join(san_dir, "*")))
    if len(sys.argv) > 3:
        for pat in ("*.stderr", "*.log"):
            for log in glob.glob(os.path.join(sys.argv[3], "**", pat), recursive=True):
                with open(log, errors="replace") as f:
                    text = f.read()
                if "ERROR: AddressSanitizer" in text or "runtime error:" in text \
                        or "ERROR: LeakSanitizer" in text:
                    reports.append(log)
    if reports:
        failed += 1
        for r in reports:
            print("SANITIZER REPORT %s:" % r)
            with open(r, errors="replace") as f:
                print(f.read()[:4000])
    else:
        passed += 1     # the sanitizer check itself
    line = "%d passed, %d failed" % (passed, failed)
    if skipped:
        line += ", %d skipped" % skipped
    print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
