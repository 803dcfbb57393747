// A real browser against `wsedge demo`: the token travels as a `bearer.` subprotocol entry,
// the chat core streams an answer, the browser's TCP connection is cut in the middle of it
// (`ss -K`, as a network change would), and the page resumes with last_seq.
// Usage: node resume.js PAGE_URL EDGE_PORT
const { chromium } = require('playwright-core');
const { execFileSync } = require('child_process');

const [pageUrl, edgePort] = process.argv.slice(2);
const text = (page, id) => page.textContent('#' + id);
const until = (page, id, fragment) => page.waitForFunction(
  ([id, fragment]) => document.getElementById(id).textContent.includes(fragment),
  [id, fragment], { timeout: 15000 });

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await browser.newPage();
    await page.goto(pageUrl);
    await until(page, 'status', 'the chat core sees user alice');
    console.log('status: ' + await text(page, 'status'));
    await page.click('button');
    await until(page, 'log', 'streamed');
    execFileSync('ss', ['-K', 'dst', '127.0.0.1', 'dport', '=', ':' + edgePort]);
    await until(page, 'status', 'resuming');
    console.log('status: ' + await text(page, 'status'));
    await until(page, 'log', 'who you are.');
    console.log('status: ' + await text(page, 'status'));
    console.log('log: ' + (await text(page, 'log')).trim().replace(/\s+/g, ' '));
  } finally {
    await browser.close();
  }
})().catch((error) => { console.error('FAILED: ' + error.message); process.exit(1); });
