<#
.SYNOPSIS
  Dream Window on Windows in one step: a virtual environment with dreamd in the
  checkout (.venv), then the Rainmeter skin installed for it.

.DESCRIPTION
  Run from anywhere:
      powershell -ExecutionPolicy Bypass -File rainmeter_skin\install.ps1
  It does what these commands do (the README's Windows install):
      py -3 -m venv .venv
      .venv\Scripts\python -m pip install -e .
      .venv\Scripts\python -m dreamd rainmeter install
  The last one copies the skin into Rainmeter's Skins folder (from Rainmeter.ini's
  SkinPath, else Documents\Rainmeter\Skins) and writes its Variables.inc with this
  install's data dir, output dir and python. Run it again after moving things.

.PARAMETER SkinsDir
  Rainmeter's Skins folder, when it is somewhere the installer does not look.

.PARAMETER DataDir
  The data dir the skin shows and controls (default: dreamd's, %LOCALAPPDATA%\dreamd).

.PARAMETER NoAutoStart
  Do not start `dreamd run` when the skin loads and no daemon runs.
#>
param(
    [string]$SkinsDir = "",
    [string]$DataDir = "",
    [switch]$NoAutoStart
)
$ErrorActionPreference = "Stop"

$Checkout = Split-Path -Parent $PSScriptRoot
$Venv = Join-Path $Checkout ".venv"
$Python = Join-Path $Venv "Scripts\python.exe"

if (-not (Test-Path $Python)) {
    Write-Host "creating $Venv"
    if (Get-Command py -ErrorAction SilentlyContinue) {
        & py -3 -m venv $Venv
    } elseif (Get-Command python -ErrorAction SilentlyContinue) {
        & python -m venv $Venv
    } else {
        throw "no Python found: install Python 3.11 or newer from python.org (with the py launcher), then run this again"
    }
    if ($LASTEXITCODE -ne 0) { throw "creating the virtual environment failed" }
}

Write-Host "installing dreamd into $Venv (PyTorch the first time: a few minutes)"
& $Python -m pip install --quiet --upgrade pip
& $Python -m pip install --quiet -e $Checkout
if ($LASTEXITCODE -ne 0) { throw "pip install -e $Checkout failed" }

$Arguments = @("-m", "dreamd")
if ($DataDir) { $Arguments += @("--data-dir", $DataDir) }
$Arguments += @("rainmeter", "install")
if ($SkinsDir) { $Arguments += @("--skins-dir", $SkinsDir) }
if ($NoAutoStart) { $Arguments += "--no-autostart" }
& $Python @Arguments
if ($LASTEXITCODE -ne 0) { throw "dreamd rainmeter install failed (exit code $LASTEXITCODE)" }
